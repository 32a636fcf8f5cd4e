"""Drift of live requests against the champion snapshot's reference profile.

Each scored request adds its features and the champion's probability to a
sliding window, and the probability to an ADWIN detector (River). Only the
detector runs per request, so each detected change is counted exactly once,
by the request that revealed it. The population stability index and the
shares of missing features and unseen categories are computed from the
window by :meth:`DriftMonitor.refresh`, which a background thread calls every
few seconds; scraping /metrics reads the last values and changes nothing.
``docs/drift.md`` gives every formula.
"""

from __future__ import annotations

import logging
import math
import statistics
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river import drift

from services.scorer.metrics import ScorerMetrics
from shared.drift import (
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    population_stability_index,
    shares_from_counts,
)

logger = logging.getLogger(__name__)

_NAN = float("nan")
# The window is read in slices of this many requests, with a pause after each
# slice and after each feature. A slice takes about a millisecond.
_ENTRIES_PER_SLICE = 500
_YIELD_SECONDS = 0.001


@dataclass(frozen=True)
class DriftReport:
    """Drift statistics of one window; None where a value is undefined for lack of data."""

    window_requests: int
    feature_psi: dict[str, float | None] = field(default_factory=dict)
    missing_ratio: dict[str, float | None] = field(default_factory=dict)
    reference_missing_ratio: dict[str, float] = field(default_factory=dict)
    unseen_category_ratio: dict[str, float | None] = field(default_factory=dict)
    score_psi: float | None = None
    mean_score: float | None = None


class DriftMonitor:
    """A sliding window of recent requests and a change detector on the predicted click rate.

    ``observe`` may be called from several threads at once.
    """

    def __init__(
        self, window_size: int, detector_delta: float, metrics: ScorerMetrics | None = None
    ) -> None:
        self.metrics = metrics
        self.detector_delta = detector_delta
        self.detections = 0
        self._window: deque[tuple[Mapping[str, Any], float | None]] = deque(maxlen=window_size)
        self._detector = drift.ADWIN(delta=detector_delta)
        self._lock = threading.Lock()
        self._exported_features: set[str] = set()

    def observe(self, features: Mapping[str, Any], champion_probability: float | None) -> bool:
        """Add one scored request; return whether it revealed a change in the predicted rate.

        ``features`` must not be changed afterwards, because the window keeps
        a reference to it. ``champion_probability`` is None when the
        challenger scored the request.
        """
        with self._lock:
            self._window.append((features, champion_probability))
            if champion_probability is None:
                return False
            self._detector.update(champion_probability)
            detected = self._detector.drift_detected
            if detected:
                self.detections += 1

        if detected:
            if self.metrics is not None:
                self.metrics.prediction_drifts.inc()
            logger.warning(
                "Drift detected in the champion's predicted click rate (detection %d); "
                "the detector starts afresh from the next request",
                self.detections,
            )
        return detected

    def snapshot(self) -> list[tuple[Mapping[str, Any], float | None]]:
        """Return a copy of the window, oldest request first."""
        with self._lock:
            return list(self._window)

    def compute(self, reference: ReferenceProfile | None) -> DriftReport:
        """Compute the drift statistics of the current window against ``reference``."""
        window = self.snapshot()
        scores = [score for _, score in window if score is not None]
        mean_score = statistics.fmean(scores) if scores else None
        if reference is None:
            return DriftReport(window_requests=len(window), mean_score=mean_score)

        values = _collect_values(window, reference.features.keys())
        report = DriftReport(
            window_requests=len(window),
            score_psi=_psi(reference.score, bin_counts_fast(reference.score, scores)),
            mean_score=mean_score,
        )
        for name, profile in reference.features.items():
            time.sleep(_YIELD_SECONDS)
            live = values[name]
            counts = bin_counts_fast(profile, live)
            report.feature_psi[name] = _psi(profile, counts)
            report.missing_ratio[name] = 1.0 - len(live) / len(window) if window else None
            report.reference_missing_ratio[name] = 1.0 - reference.presence[name]
            if isinstance(profile, CategoricalProfile):
                report.unseen_category_ratio[name] = _unseen_share(profile, live)
        return report

    def refresh(self, reference: ReferenceProfile | None) -> DriftReport:
        """Compute the statistics and set the drift gauges; never touches the detector."""
        report = self.compute(reference)
        if self.metrics is not None:
            self._export(report)
        return report

    def _export(self, report: DriftReport) -> None:
        metrics = self.metrics
        assert metrics is not None
        metrics.drift_window_requests.set(report.window_requests)
        metrics.score_psi.set(_or_nan(report.score_psi))
        metrics.predicted_ctr_mean.set(_or_nan(report.mean_score))

        for name, psi in report.feature_psi.items():
            metrics.feature_psi.labels(feature=name).set(_or_nan(psi))
            metrics.feature_missing_ratio.labels(feature=name).set(
                _or_nan(report.missing_ratio[name])
            )
            metrics.feature_reference_missing_ratio.labels(feature=name).set(
                report.reference_missing_ratio[name]
            )
        for name, share in report.unseen_category_ratio.items():
            metrics.feature_unseen_category_ratio.labels(feature=name).set(_or_nan(share))

        # A feature that a newer reference no longer lists keeps its series,
        # set to NaN, so that its last value cannot fire an alert.
        current = set(report.feature_psi)
        for name in self._exported_features - current:
            metrics.feature_psi.labels(feature=name).set(_NAN)
            metrics.feature_missing_ratio.labels(feature=name).set(_NAN)
            metrics.feature_reference_missing_ratio.labels(feature=name).set(_NAN)
            metrics.feature_unseen_category_ratio.labels(feature=name).set(_NAN)
        self._exported_features = current


def _or_nan(value: float | None) -> float:
    return _NAN if value is None or not math.isfinite(value) else value


def _collect_values(
    window: list[tuple[Mapping[str, Any], float | None]], names: Iterable[str]
) -> dict[str, list[Any]]:
    """Return each named feature's values in the window, skipping requests without it."""
    values: dict[str, list[Any]] = {name: [] for name in names}
    for start in range(0, len(window), _ENTRIES_PER_SLICE):
        for features, _ in window[start : start + _ENTRIES_PER_SLICE]:
            for name, value in features.items():
                found = values.get(name)
                if found is not None:
                    found.append(value)
        # Let the request threads run: under CPython's GIL a busy background
        # thread delays an I/O-bound event loop by far more than its own CPU time.
        time.sleep(_YIELD_SECONDS)
    return values


def bin_counts_fast(profile: NumericProfile | CategoricalProfile, values: list[Any]) -> list[int]:
    """Count values in the profile's bins; the same result as ``shared.drift.bin_counts``.

    Categorical values are tallied first, so each distinct value is looked up
    once. Numbers are binned with numpy's ``searchsorted``, which puts a value
    equal to an edge in the lower bin as ``bisect_left`` does.
    """
    if isinstance(profile, CategoricalProfile):
        counts = [0] * len(profile.shares)
        for (_, value), count in _tally(values).items():
            counts[profile.bin_index(value)] += count
        return counts

    # Exact types, as JSON decoding produces them; bool is an int subclass and excluded.
    numbers = np.asarray([v for v in values if type(v) is float or type(v) is int], dtype=float)
    numbers = numbers[np.isfinite(numbers)]
    positions = np.searchsorted(np.asarray(profile.edges, dtype=float), numbers, side="left")
    return np.bincount(positions, minlength=len(profile.shares)).tolist()


def _tally(values: list[Any]) -> Counter[tuple[type, Any]]:
    # The type is part of the key so that True, 1 and 1.0 stay apart.
    return Counter(zip(map(type, values), values, strict=True))


def _psi(profile: NumericProfile | CategoricalProfile, counts: list[int]) -> float | None:
    if sum(counts) == 0 or profile.count == 0:
        return None
    return population_stability_index(profile.shares, shares_from_counts(counts))


def _unseen_share(profile: CategoricalProfile, values: list[Any]) -> float | None:
    if not values:
        return None
    tally = _tally(values)
    unseen = sum(count for (_, value), count in tally.items() if not profile.is_listed(value))
    return unseen / len(values)
