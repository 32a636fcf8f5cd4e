"""Replay arms: when a retrain arm rebuilds, and what each rebuild learns."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import pytest

from shared.events import Click, Impression, LabeledExample, LabelSource
from shared.join import JoinSettings
from shared.learn.learner import OnlineLearner
from shared.learn.models import build_model
from shared.replay.arms import ArmSpec, ReplayArm
from shared.replay.runner import Replay, ReplayConfig

START = 1_700_000_000.0
IMPRESSION_GAP_SECONDS = 10.0
FREEZE_OFFSET_SECONDS = 300.0
RETRAIN_EVERY_SECONDS = 200.0


def _moment(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def stream(impressions: int = 120, seed: int = 5) -> list[Impression | Click]:
    """Build impressions 10 s apart on three items, a third of them clicked 5 to 50 s later."""
    rng = random.Random(seed)
    timed: list[tuple[float, int, Impression | Click]] = []
    for n in range(impressions):
        event_time = START + n * IMPRESSION_GAP_SECONDS
        item = f"item-{n % 3}"
        timed.append(
            (
                event_time,
                0,
                Impression(
                    impression_id=f"i{n}",
                    event_time=event_time,
                    item_id=item,
                    features={"slot": f"s{n % 2}"},
                ),
            )
        )
        if rng.random() < 0.33:
            click_time = event_time + rng.uniform(5.0, 50.0)
            timed.append((click_time, 1, Click(impression_id=f"i{n}", event_time=click_time)))
    timed.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in timed]


def test_retrain_times_and_examples() -> None:
    events = stream()
    decided: list[LabeledExample] = []
    # No lateness, so the join releases labels in the order they were decided.
    config = ReplayConfig(
        events=Path("unused"),
        freshness=True,
        freeze_at=_moment(START + FREEZE_OFFSET_SECONDS),
        retrain_every_seconds=RETRAIN_EVERY_SECONDS,
        join=JoinSettings(window_seconds=60.0, allowed_lateness_seconds=0.0),
    )

    result = Replay(config, on_example=decided.append).replay(events)

    retrained = next(arm for arm in result.arms if arm.spec.schedule == "retrain")
    last_impression = max(event.ts for event in events if event.type == "impression")
    due = START + FREEZE_OFFSET_SECONDS + RETRAIN_EVERY_SECONDS
    expected_times = []
    while due <= last_impression:
        expected_times.append(due)
        due += RETRAIN_EVERY_SECONDS
    assert [retrain.event_time for retrain in retrained.retrains] == expected_times
    for retrain in retrained.retrains:
        before = [e for e in decided if e.decided_at.timestamp() < retrain.event_time]
        assert retrain.examples == len(before)
        assert decided[: retrain.examples] == before

    # The serving model is exactly a fresh model trained on the last rebuild's examples.
    reference = build_model(config.model)
    for example in decided[: retrained.retrains[-1].examples]:
        reference.learn_one(example.impression.learning_features(), bool(example.label))
    probes = [event for event in events if event.type == "impression"][:6]
    for probe in probes:
        x = probe.learning_features()
        assert retrained.learner.model.predict_proba_one(x) == reference.predict_proba_one(x)


def test_frozen_arm_stops_learning_at_freeze() -> None:
    events = stream()
    config = ReplayConfig(
        events=Path("unused"),
        freshness=True,
        freeze_at=_moment(START + FREEZE_OFFSET_SECONDS),
        retrain_every_seconds=RETRAIN_EVERY_SECONDS,
        join=JoinSettings(window_seconds=60.0, allowed_lateness_seconds=0.0),
    )
    replay = Replay(config)
    late = [event for event in events if event.ts >= START + 2 * FREEZE_OFFSET_SECONDS]
    early = [event for event in events if event.ts < START + 2 * FREEZE_OFFSET_SECONDS]
    replay.feed(early)
    frozen = next(arm for arm in replay.arms if arm.spec.schedule == "frozen")
    probe = events[0].learning_features()
    before = frozen.learner.model.predict_proba_one(probe)

    replay.feed(late)
    replay.finish()

    assert frozen.learner.model.predict_proba_one(probe) == before
    assert replay.learner.model.predict_proba_one(probe) != before


def _example(impression_id: str, label: int, source: LabelSource, decided_at: float):
    impression = Impression(impression_id=impression_id, event_time=START, item_id="a", features={})
    return LabeledExample(
        impression=impression,
        label=label,
        label_delay_seconds=decided_at - START,
        label_source=source,
        decided_at=_moment(decided_at),
    )


def test_correction_turns_negative_positive() -> None:
    spec = ArmSpec("prior retrained", "prior", "retrain", learn_until=START, retrain_every=100.0)
    arm = ReplayArm(spec, OnlineLearner(model_name="prior"))
    arm.learn(_example("i1", 0, LabelSource.WINDOW_CLOSED, START + 10), None, evaluate=False)
    arm.learn(_example("i2", 0, LabelSource.WINDOW_CLOSED, START + 20), None, evaluate=False)
    arm.learn(
        _example("i1", 1, LabelSource.LATE_CLICK_CORRECTION, START + 30), None, evaluate=False
    )

    arm.serve(Impression(impression_id="i3", event_time=START + 150, item_id="a", features={}))

    assert [(r.event_time, r.examples) for r in arm.retrains] == [(START + 100, 2)]
    # The rebuilt running click rate counts one click in two examples, not two in three.
    assert arm.learner.model.clicks == 1
    assert arm.learner.model.examples == 2


def test_retrain_arm_needs_period() -> None:
    spec = ArmSpec("ctr retrained", "ctr", "retrain", learn_until=START, retrain_every=None)

    with pytest.raises(ValueError, match="positive retrain_every"):
        ReplayArm(spec, OnlineLearner())
