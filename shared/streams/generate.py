"""Generate a seeded synthetic impression and click stream whose true click probabilities are known.

Each impression shows a random item to a random user. Its true click
probability is a logistic model::

    logit(p) = logit(base_click_rate) + item effect + category effect
               + price_effect * standardised log price + user segment effect

Item, category and segment effects are drawn once per run from normal
distributions with the configured standard deviations. A click happens with
probability ``p``, at the impression time plus a delay drawn from the
configured distribution. An optional drift changes the base rate and can
negate chosen effects for impressions at or after a set time. A share of the
clicks can be lost, so their click events never arrive.

Arrivals are a Poisson process at ``impressions_per_second``, and all times
are whole microseconds, so the events and the truth agree exactly.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gzip
import heapq
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Annotated, Literal

import numpy as np
import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from shared.events import Click, Impression
from shared.streams.obd import ImportSummary, write_events_with_summary

# A run uses about 210 bytes per impression (truth list and arrays, measured
# with tracemalloc on CPython 3.11 for 200,000 impressions), so this maximum
# keeps one run near 2 GB of memory.
MAX_IMPRESSIONS = 10_000_000
# Log prices are drawn from Normal(mean, sd). The price feature standardises
# with the same parameters, so the price effect is per standard deviation.
LOG_PRICE_MEAN = math.log(30.0)
LOG_PRICE_SD = 0.8
# Drawn delays are capped here, so that a heavy log-normal tail cannot
# overflow the event time.
MAX_DELAY_SECONDS = 365 * 86_400.0
# Longest expected stream, impressions / impressions_per_second, in seconds.
MAX_EXPECTED_SPAN_SECONDS = 10 * 365 * 86_400.0
# Probabilities are clipped to [eps, 1 - eps] before taking logarithms.
_PROBABILITY_EPSILON = 1e-15

EffectName = Literal["item", "category", "price", "segment"]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExponentialDelay(_Settings):
    """Click delays drawn from an exponential distribution."""

    kind: Literal["exponential"] = "exponential"
    mean_seconds: float = Field(gt=0)


class LognormalDelay(_Settings):
    """Click delays drawn from a log-normal distribution."""

    kind: Literal["lognormal"] = "lognormal"
    median_seconds: float = Field(gt=0)
    # Standard deviation of the delay's natural logarithm.
    sigma: float = Field(gt=0)


DelayDistribution = Annotated[ExponentialDelay | LognormalDelay, Field(discriminator="kind")]


class Drift(_Settings):
    """A change of the click model for impressions at or after ``at``."""

    at: AwareDatetime
    base_click_rate: float | None = Field(default=None, gt=0, lt=1)
    flip_effects: frozenset[EffectName] = frozenset()

    @model_validator(mode="after")
    def _check_changes_something(self) -> Drift:
        if self.base_click_rate is None and not self.flip_effects:
            raise ValueError("a drift must set base_click_rate, flip_effects or both")
        return self


class GeneratorSettings(_Settings):
    """Parameters of a synthetic stream, which fix the stream for a given numpy version."""

    seed: int = Field(default=0, ge=0)
    impressions: int = Field(default=10_000, gt=0, le=MAX_IMPRESSIONS)
    start_time: AwareDatetime = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    impressions_per_second: float = Field(default=10.0, gt=0)
    users: int = Field(default=1_000, gt=0)
    items: int = Field(default=200, gt=0)
    categories: int = Field(default=20, gt=0)
    user_segments: int = Field(default=4, gt=0)
    # Click probability when every effect is zero. The mean over impressions differs.
    base_click_rate: float = Field(default=0.05, gt=0, lt=1)
    # Standard deviations of the per-item, per-category and per-segment logit effects.
    item_effect_sd: float = Field(default=0.5, ge=0)
    category_effect_sd: float = Field(default=0.3, ge=0)
    segment_effect_sd: float = Field(default=0.3, ge=0)
    # Logit change per standard deviation of log price.
    price_effect: float = -0.3
    delay: DelayDistribution = ExponentialDelay(mean_seconds=300.0)
    drift: Drift | None = None
    # Share of clicks whose click event never arrives.
    lost_click_share: float = Field(default=0.0, ge=0, le=1)

    @model_validator(mode="after")
    def _check_span(self) -> GeneratorSettings:
        expected_span_seconds = self.impressions / self.impressions_per_second
        if expected_span_seconds > MAX_EXPECTED_SPAN_SECONDS:
            raise ValueError(
                f"impressions / impressions_per_second is {expected_span_seconds:.0f} seconds, "
                f"more than the maximum {MAX_EXPECTED_SPAN_SECONDS:.0f}; raise "
                f"impressions_per_second or lower impressions"
            )
        return self


@dataclasses.dataclass(frozen=True, slots=True)
class TruthRecord:
    """Drawn outcome of one impression.

    ``clicked`` is whether the user clicked, lost clicks included.
    ``click_delay_seconds`` is set only when a click event is in the stream.
    """

    impression_id: str
    true_probability: float
    clicked: bool
    click_delay_seconds: float | None
    click_lost: bool = False


@dataclasses.dataclass(frozen=True)
class BayesLogLoss:
    """Log loss (natural logarithm) of predicting each impression's true probability."""

    # Mean binary entropy of the true probabilities, the Bayes-optimal expected loss.
    expected: float
    # Mean log loss of the true probabilities on the realised ``clicked`` labels.
    realised: float


@dataclasses.dataclass(frozen=True)
class _Draws:
    """Per-impression arrays of one run, in impression order."""

    offsets_us: np.ndarray
    users: np.ndarray
    items: np.ndarray
    probabilities: np.ndarray
    clicked: np.ndarray
    lost: np.ndarray
    delays_us: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Catalogue:
    """Fixed attributes of items and users and the drawn model effects."""

    item_categories: np.ndarray
    item_prices: np.ndarray
    user_segments: np.ndarray
    item_effects: np.ndarray
    category_effects: np.ndarray
    segment_effects: np.ndarray


def generate(settings: GeneratorSettings) -> tuple[Iterator[Impression | Click], list[TruthRecord]]:
    """Draw a stream and return its events in event-time order with one truth record per impression.

    All random draws happen here, in memory, as numpy arrays plus the truth
    list. The returned iterator builds events lazily from those arrays.
    Impressions come before clicks at equal times. The same settings give the
    same output with the same numpy version, but numpy does not promise that
    its distributions stay identical across versions.
    """
    rng = np.random.default_rng(settings.seed)
    catalogue = _draw_catalogue(settings, rng)
    draws = _draw_impressions(settings, catalogue, rng)
    truth = _build_truth(settings, draws)
    return _iter_events(settings, catalogue, draws), truth


def _impression_id(settings: GeneratorSettings, index: int) -> str:
    return f"gen-{settings.seed}-{index}"


def _draw_catalogue(settings: GeneratorSettings, rng: np.random.Generator) -> _Catalogue:
    item_categories = rng.integers(0, settings.categories, size=settings.items)
    item_prices = np.round(np.exp(rng.normal(LOG_PRICE_MEAN, LOG_PRICE_SD, size=settings.items)), 2)
    user_segments = rng.integers(0, settings.user_segments, size=settings.users)
    return _Catalogue(
        item_categories=item_categories,
        item_prices=item_prices,
        user_segments=user_segments,
        item_effects=rng.normal(0.0, settings.item_effect_sd, size=settings.items),
        category_effects=rng.normal(0.0, settings.category_effect_sd, size=settings.categories),
        segment_effects=rng.normal(0.0, settings.segment_effect_sd, size=settings.user_segments),
    )


def _draw_impressions(
    settings: GeneratorSettings, catalogue: _Catalogue, rng: np.random.Generator
) -> _Draws:
    count = settings.impressions

    # Poisson arrivals have exponential gaps. The first impression is at start_time.
    gaps_seconds = rng.exponential(1.0 / settings.impressions_per_second, size=count)
    gaps_seconds[0] = 0.0
    offsets_us = np.round(np.cumsum(gaps_seconds) * 1e6).astype(np.int64)

    users = rng.integers(0, settings.users, size=count)
    items = rng.integers(0, settings.items, size=count)
    probabilities = _true_probabilities(settings, catalogue, offsets_us, users, items)

    # Every draw is made for every impression, clicked or not. So settings of
    # the click model (rates, effects, drift, lost share) change only which
    # impressions click, never the arrivals, users, items or delays.
    clicked = rng.random(size=count) < probabilities
    lost = clicked & (rng.random(size=count) < settings.lost_click_share)
    delays_seconds = np.minimum(_draw_delays_seconds(settings, rng, count), MAX_DELAY_SECONDS)
    delays_us = np.round(delays_seconds * 1e6).astype(np.int64)
    return _Draws(offsets_us, users, items, probabilities, clicked, lost, delays_us)


def _true_probabilities(
    settings: GeneratorSettings,
    catalogue: _Catalogue,
    offsets_us: np.ndarray,
    users: np.ndarray,
    items: np.ndarray,
) -> np.ndarray:
    standardised_price = (np.log(catalogue.item_prices[items]) - LOG_PRICE_MEAN) / LOG_PRICE_SD
    effects: dict[str, np.ndarray] = {
        "item": catalogue.item_effects[items],
        "category": catalogue.category_effects[catalogue.item_categories[items]],
        "price": settings.price_effect * standardised_price,
        "segment": catalogue.segment_effects[catalogue.user_segments[users]],
    }
    base_logit = np.full(len(items), _logit(settings.base_click_rate))

    drift = settings.drift
    if drift is not None:
        drift_offset_us = (drift.at - settings.start_time) // dt.timedelta(microseconds=1)
        after_drift = offsets_us >= drift_offset_us
        if drift.base_click_rate is not None:
            base_logit[after_drift] = _logit(drift.base_click_rate)
        for name in drift.flip_effects:
            effects[name] = np.where(after_drift, -effects[name], effects[name])

    logits = base_logit + sum(effects.values())
    return 1.0 / (1.0 + np.exp(-logits))


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


def _draw_delays_seconds(
    settings: GeneratorSettings, rng: np.random.Generator, count: int
) -> np.ndarray:
    delay = settings.delay
    if isinstance(delay, ExponentialDelay):
        return rng.exponential(delay.mean_seconds, size=count)
    return rng.lognormal(math.log(delay.median_seconds), delay.sigma, size=count)


def _build_truth(settings: GeneratorSettings, draws: _Draws) -> list[TruthRecord]:
    truth = []
    for index in range(settings.impressions):
        clicked = bool(draws.clicked[index])
        lost = bool(draws.lost[index])
        delay_seconds = int(draws.delays_us[index]) / 1e6 if clicked and not lost else None
        truth.append(
            TruthRecord(
                impression_id=_impression_id(settings, index),
                true_probability=float(draws.probabilities[index]),
                clicked=clicked,
                click_delay_seconds=delay_seconds,
                click_lost=lost,
            )
        )
    return truth


def _iter_events(
    settings: GeneratorSettings, catalogue: _Catalogue, draws: _Draws
) -> Iterator[Impression | Click]:
    """Merge impressions and clicks by (time, impressions first, impression index)."""
    impression_keys = ((int(offset), 0, index) for index, offset in enumerate(draws.offsets_us))

    delivered = np.flatnonzero(draws.clicked & ~draws.lost)
    click_offsets_us = draws.offsets_us[delivered] + draws.delays_us[delivered]
    click_order = np.lexsort((delivered, click_offsets_us))
    click_keys = (
        (int(click_offsets_us[position]), 1, int(delivered[position])) for position in click_order
    )

    for offset_us, kind, index in heapq.merge(impression_keys, click_keys):
        event_time = settings.start_time + dt.timedelta(microseconds=offset_us)
        if kind == 0:
            yield _build_impression(settings, catalogue, draws, index, event_time)
        else:
            yield Click(impression_id=_impression_id(settings, index), event_time=event_time)


def _build_impression(
    settings: GeneratorSettings,
    catalogue: _Catalogue,
    draws: _Draws,
    index: int,
    event_time: dt.datetime,
) -> Impression:
    user = int(draws.users[index])
    item = int(draws.items[index])
    return Impression(
        impression_id=_impression_id(settings, index),
        event_time=event_time,
        user_id=f"u{user}",
        item_id=f"i{item}",
        features={
            "category": f"c{int(catalogue.item_categories[item])}",
            "price": float(catalogue.item_prices[item]),
            "user_segment": f"s{int(catalogue.user_segments[user])}",
        },
    )


def bayes_log_loss(truth: Sequence[TruthRecord]) -> BayesLogLoss:
    """Compute the log loss of the Bayes-optimal predictor, expected and realised.

    Both use the user's click as the label. When clicks are lost the stream
    shows fewer positives, and the best predictor of a click event in the
    stream is ``true_probability * (1 - lost_click_share)`` instead.
    """
    if not truth:
        raise ValueError("truth is empty; generate at least one impression")
    probabilities = np.clip(
        np.array([record.true_probability for record in truth]),
        _PROBABILITY_EPSILON,
        1.0 - _PROBABILITY_EPSILON,
    )
    clicked = np.array([record.clicked for record in truth])

    entropy = -(
        probabilities * np.log(probabilities) + (1 - probabilities) * np.log1p(-probabilities)
    )
    realised = -np.where(clicked, np.log(probabilities), np.log1p(-probabilities))
    return BayesLogLoss(expected=float(entropy.mean()), realised=float(realised.mean()))


def write_truth(path: Path, truth: Sequence[TruthRecord]) -> None:
    """Write truth records as JSON Lines, gzip-compressed when ``path`` ends in ``.gz``.

    The gzip header carries no timestamp, so the same truth always gives the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as file_handle:
        handle: IO[bytes] = file_handle
        if path.suffix == ".gz":
            handle = gzip.GzipFile(filename="", fileobj=file_handle, mode="wb", mtime=0)
        for record in truth:
            handle.write(orjson.dumps(dataclasses.asdict(record)))
            handle.write(b"\n")
        handle.close()


def read_truth(path: Path) -> list[TruthRecord]:
    """Read truth records written by :func:`write_truth`, gzip-compressed or not."""
    path = Path(path)
    with open(path, "rb") as probe:
        compressed = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if compressed else open
    with opener(path, "rb") as handle:
        return [TruthRecord(**orjson.loads(line)) for line in handle if line.strip()]


def write_generated(
    settings: GeneratorSettings, out: Path, truth_out: Path | None = None
) -> ImportSummary:
    """Generate a stream and write its events to ``out`` and, if given, its truth to ``truth_out``.

    The summary's details hold the number of lost clicks.
    """
    events, truth = generate(settings)
    summary = write_events_with_summary(Path(out), events)
    if truth_out is not None:
        write_truth(Path(truth_out), truth)
    lost_clicks = sum(record.click_lost for record in truth)
    return dataclasses.replace(summary, details={"lost_clicks": lost_clicks})


def drift_time_at_fraction(settings: GeneratorSettings, fraction: float) -> dt.datetime:
    """Return the expected event time of the impression at ``fraction`` of the stream.

    Arrivals are random, so the share of impressions before this time is
    close to ``fraction`` but not exact.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction {fraction} is outside [0, 1]; pass a share of the stream")
    expected_seconds = fraction * (settings.impressions - 1) / settings.impressions_per_second
    return settings.start_time + dt.timedelta(seconds=expected_seconds)
