"""Fake-negative calibration against a naive short window, on clicks with a long delay tail.

The generated stream's clicks come after a log-normal delay with a median of
10 minutes and a tail of hours, so a 10-minute window misses about half of
them. Scores are judged against the generator's truth: the true click
probability of each impression and whether it was ever clicked.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from shared.events import LabeledExample, LabelSource
from shared.join import JoinSettings, LateClickPolicy
from shared.learn.learner import DelayedFeedback
from shared.metrics.binary import binary_entropy
from shared.replay.runner import Replay, ReplayConfig
from shared.streams.generate import GeneratorSettings, LognormalDelay, TruthRecord, generate

WINDOW_SECONDS = 600.0
# Late clicks are forwarded as corrections for a day after the window.
RETENTION_SECONDS = 86_400.0
# Impressions in the first 90 minutes are left out: until the delay tail has
# arrived, every learner has seen only part of the clicks of its first hour.
WARM_UP_SECONDS = 5_400.0

SETTINGS = GeneratorSettings(
    seed=2,
    impressions=12_000,
    impressions_per_second=1.0,
    base_click_rate=0.1,
    delay=LognormalDelay(median_seconds=600.0, sigma=1.5),
)


@dataclass(frozen=True)
class Measured:
    """Served scores after warm-up, judged against the generator's truth."""

    examples: int
    # Predicted clicks over the sum of true click probabilities: 1.0 is calibrated.
    calibration: float
    # Normalised entropy against whether each impression was ever clicked.
    normalized_entropy: float


@pytest.fixture(scope="module")
def stream() -> tuple[list, dict[str, TruthRecord]]:
    events, truth = generate(SETTINGS)
    return list(events), {record.impression_id: record for record in truth}


def measure(
    stream: tuple[list, dict[str, TruthRecord]],
    delayed_feedback: DelayedFeedback,
    late_clicks: LateClickPolicy,
) -> Measured:
    events, truth = stream
    evaluated: list[str] = []

    def record(example: LabeledExample) -> None:
        # The served-score metrics leave corrections out, and so does this list.
        if example.label_source != LabelSource.LATE_CLICK_CORRECTION:
            evaluated.append(example.impression.impression_id)

    config = ReplayConfig(
        events=Path("unused"),
        delayed_feedback=delayed_feedback,
        join=JoinSettings(
            window_seconds=WINDOW_SECONDS,
            late_click_policy=late_clicks,
            closed_retention_seconds=RETENTION_SECONDS,
        ),
    )
    result = Replay(config, on_example=record).replay(events)

    scores, _ = result.evaluation.served["model"].scores_and_labels()
    assert len(scores) == len(evaluated)
    start = SETTINGS.start_time + dt.timedelta(seconds=WARM_UP_SECONDS)
    after_warm_up = np.frombuffer(result.evaluated_times) >= start.timestamp()
    scores = np.clip(scores[after_warm_up], 1e-15, 1 - 1e-15)
    pairs = zip(evaluated, after_warm_up, strict=True)
    records = [truth[impression_id] for impression_id, keep in pairs if keep]
    probabilities = np.array([record.true_probability for record in records])
    clicked = np.array([record.clicked for record in records])

    log_loss = -np.where(clicked, np.log(scores), np.log1p(-scores)).mean()
    return Measured(
        examples=len(records),
        calibration=float(scores.sum() / probabilities.sum()),
        normalized_entropy=float(log_loss / binary_entropy(clicked.mean())),
    )


@pytest.fixture(scope="module")
def naive(stream) -> Measured:
    """Learn each label once its 10-minute window decides it; later clicks are lost."""
    return measure(stream, "none", LateClickPolicy.DROP)


@pytest.fixture(scope="module")
def corrected(stream) -> Measured:
    """Learn every impression as a negative when served, and every click when it comes."""
    return measure(stream, "fake_negative", LateClickPolicy.CORRECT)


def test_short_window_underpredicts(naive: Measured) -> None:
    # The window catches about half the clicks, so the naive model predicts about half.
    assert naive.examples > 6_000
    assert naive.calibration < 0.6


def test_fake_negative_restores_calibration(naive: Measured, corrected: Measured) -> None:
    assert abs(corrected.calibration - 1.0) < 0.1
    assert abs(corrected.calibration - 1.0) < abs(naive.calibration - 1.0) - 0.3


def test_fake_negative_normalized_entropy(naive: Measured, corrected: Measured) -> None:
    assert corrected.normalized_entropy < naive.normalized_entropy + 0.01


def test_fake_negative_beats_corrections_alone(stream, corrected: Measured) -> None:
    # Without the calibration, a late click makes the model learn its
    # impression twice, a negative then a positive, which biases it low.
    uncalibrated = measure(stream, "none", LateClickPolicy.CORRECT)

    assert abs(corrected.calibration - 1.0) < abs(uncalibrated.calibration - 1.0)
