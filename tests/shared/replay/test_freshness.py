"""Freshness experiment: online learning against frozen and retrained copies, on known drift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.join import JoinSettings
from shared.metrics.binary import binary_entropy, log_loss_one
from shared.replay.experiments import freshness
from shared.replay.runner import Replay, ReplayConfig, ReplayResult
from shared.streams.generate import (
    Drift,
    ExponentialDelay,
    GeneratorSettings,
    drift_time_at_fraction,
    generate,
)

RETRAIN_EVERY_SECONDS = 300.0
# The continuous model must beat the frozen one after the drift by at least
# this much normalised entropy. On this seed the gap is 0.134 (1.015 against 1.149).
MIN_ADVANTAGE_AFTER_DRIFT = 0.05

SETTINGS = GeneratorSettings(
    seed=3,
    impressions=10_000,
    impressions_per_second=5.0,
    items=50,
    categories=10,
    base_click_rate=0.1,
    item_effect_sd=1.0,
    delay=ExponentialDelay(mean_seconds=20.0),
)
DRIFT_AT = drift_time_at_fraction(SETTINGS, 0.5)
FREEZE_AT = drift_time_at_fraction(SETTINGS, 0.4)


@pytest.fixture(scope="module")
def drifted() -> ReplayResult:
    """Replay a stream whose item and category effects flip sign halfway, frozen before it."""
    settings = SETTINGS.model_copy(
        update={"drift": Drift(at=DRIFT_AT, flip_effects=frozenset({"item", "category"}))}
    )
    events, _ = generate(settings)
    config = ReplayConfig(
        events=Path("unused"),
        freshness=True,
        freeze_at=FREEZE_AT,
        retrain_every_seconds=RETRAIN_EVERY_SECONDS,
        join=JoinSettings(window_seconds=120.0, allowed_lateness_seconds=0.0),
    )
    return Replay(config).replay(events)


def test_online_beats_frozen_after_drift(drifted: ReplayResult) -> None:
    schedules = freshness.find_schedules(drifted)
    assert schedules is not None
    drift = DRIFT_AT.timestamp()

    continuous = freshness.report_between(drifted, schedules.continuous, start=drift)
    frozen = freshness.report_between(drifted, schedules.frozen, start=drift)

    assert continuous.count > 4_000
    assert continuous.normalized_entropy is not None
    assert frozen.normalized_entropy is not None
    assert continuous.normalized_entropy < frozen.normalized_entropy - MIN_ADVANTAGE_AFTER_DRIFT


def test_schedules_identical_before_freeze(drifted: ReplayResult) -> None:
    schedules = freshness.find_schedules(drifted)
    assert schedules is not None
    times = np.frombuffer(drifted.evaluated_times)
    before = times < FREEZE_AT.timestamp()
    continuous, _ = freshness.served_arrays(drifted, schedules.continuous)

    assert before.sum() > 3_000
    for arm in (schedules.frozen, schedules.retrained):
        scores, _ = freshness.served_arrays(drifted, arm)
        assert np.array_equal(scores[before], continuous[before]), arm.name
        assert not np.array_equal(scores[~before], continuous[~before]), arm.name


def test_staleness_relative_to_continuous(drifted: ReplayResult) -> None:
    schedules = freshness.find_schedules(drifted)
    assert schedules is not None

    rows = freshness.staleness_rows(drifted, schedules)

    continuous, frozen, retrained = rows
    assert continuous.relative_to_continuous == pytest.approx(0.0)
    assert frozen.relative_to_continuous == pytest.approx(
        frozen.after.normalized_entropy / continuous.after.normalized_entropy - 1.0
    )
    assert frozen.relative_to_continuous > 0.05
    # Rebuilds on data that includes the new behaviour recover part of the loss.
    assert 0 < retrained.relative_to_continuous < frozen.relative_to_continuous
    assert len(schedules.retrained.retrains) == 3
    # The frozen copy's loss after the drift is far beyond bootstrap noise.
    assert continuous.interval is None
    assert frozen.interval is not None
    assert frozen.interval.estimate == pytest.approx(
        frozen.after.normalized_entropy - continuous.after.normalized_entropy
    )
    assert frozen.interval.low > 0
    assert frozen.significantly_worse


def test_bucket_matches_direct_computation(drifted: ReplayResult) -> None:
    schedules = freshness.find_schedules(drifted)
    assert schedules is not None
    width, buckets = freshness.time_buckets(drifted, schedules)
    times = np.frombuffer(drifted.evaluated_times)
    scores, labels = freshness.served_arrays(drifted, schedules.frozen)

    bucket = buckets[len(buckets) // 2]
    inside = (times >= bucket.start) & (times < bucket.end)
    losses = [log_loss_one(s, int(y)) for s, y in zip(scores[inside], labels[inside], strict=True)]
    expected = np.mean(losses) / binary_entropy(labels[inside].mean())

    assert width == pytest.approx(RETRAIN_EVERY_SECONDS / freshness.BUCKETS_PER_PERIOD)
    assert sum(bucket.count for bucket in buckets) == len(times)
    assert bucket.count == int(inside.sum())
    assert bucket.normalized_entropy[1] == pytest.approx(expected)
    # Edges are aligned to the freeze, so no bucket straddles it.
    freeze = FREEZE_AT.timestamp()
    assert not any(b.start < freeze < b.end for b in buckets)


def test_section_outputs(drifted: ReplayResult, tmp_path: Path) -> None:
    lines = freshness.summary_lines(drifted)
    html = freshness.html_section(drifted, tmp_path)
    document = freshness.document(drifted)

    assert lines[0].startswith("Freshness: copies of ctr stop learning online at ")
    assert any(line.startswith("  ctr frozen ") for line in lines)
    assert all(len(line) <= 100 for line in lines)
    assert (tmp_path / freshness.PLOT_FILE).stat().st_size > 0
    assert f'<img src="{freshness.PLOT_FILE}"' in html
    assert html.count("<figcaption>") == 1
    assert document is not None
    assert [row["schedule"] for row in document["schedules"]] == [
        "continuous",
        "frozen",
        "retrain",
    ]
    assert [retrain["examples"] for retrain in document["retrains"]] == [
        retrain.examples for retrain in freshness.find_schedules(drifted).retrained.retrains
    ]
    json.dumps(document, allow_nan=False)


def test_plot_is_deterministic(drifted: ReplayResult, tmp_path: Path) -> None:
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        freshness.html_section(drifted, tmp_path / name)

    first = (tmp_path / "first" / freshness.PLOT_FILE).read_bytes()
    assert first == (tmp_path / "second" / freshness.PLOT_FILE).read_bytes()


def test_without_freshness_nothing() -> None:
    events, _ = generate(SETTINGS.model_copy(update={"impressions": 200}))
    result = Replay(ReplayConfig(events=Path("unused"))).replay(events)

    assert freshness.summary_lines(result) == []
    assert freshness.html_section(result, Path("unused")) == ""
    assert freshness.document(result) is None


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        (86_400.0 * 9, 86_400.0 / 4),
        (3_600.0, 3_600.0 / freshness.MIN_BUCKETS),
        (86_400.0 * 365, 86_400.0 * 365 / freshness.MAX_BUCKETS),
    ],
)
def test_bucket_width(span: float, expected: float) -> None:
    assert freshness.bucket_seconds(86_400.0, 0.0, span) == pytest.approx(expected)
