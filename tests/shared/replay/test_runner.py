"""Replay: the field's stub-model AUC case, determinism and end-of-input flush."""

from __future__ import annotations

from pathlib import Path

import pytest
from river import base

from shared.events import Click, Impression
from shared.join import JoinOutcome
from shared.replay.runner import Replay, ReplayConfig, run_replay
from shared.streams.recorded import write_events


class StubModel(base.Classifier):
    """Returns a fixed probability per impression id, learns nothing."""

    def __init__(self, probabilities: dict[str, float]) -> None:
        self.probabilities = probabilities

    def learn_one(self, x, y) -> None:
        pass

    def predict_proba_one(self, x) -> dict[bool, float]:
        probability = self.probabilities[x["name"]]
        return {True: probability, False: 1 - probability}


def impression(impression_id: str, event_time: float) -> Impression:
    return Impression(
        impression_id=impression_id,
        event_time=event_time,
        item_id="a",
        features={"ad": "a", "name": impression_id},
    )


def test_stub_model_auc_at_click_rates() -> None:
    events = [impression(f"i{n}", n - 1) for n in range(1, 5)]
    events += [Click(impression_id="i3", event_time=10), Click(impression_id="i4", event_time=11)]
    events += [impression("i9", 700)]
    labels: dict[str, int] = {}
    replay = Replay(
        ReplayConfig(events=Path("unused")),
        on_example=lambda e: labels.__setitem__(e.impression.impression_id, e.label),
    )
    # i9 is flushed at end of input as a negative; scored lowest, it keeps the AUC at 1.
    replay.learner.model = StubModel({"i1": 0.01, "i2": 0.02, "i3": 0.05, "i4": 0.08, "i9": 0.0})

    result = replay.replay(events)

    assert labels == {"i1": 0, "i2": 0, "i3": 1, "i4": 1, "i9": 0}
    assert result.evaluation.report()["served"]["model"]["auc"] == pytest.approx(1.0, abs=0.01)


def test_replay_file_twice_gives_identical_numbers(tmp_path: Path) -> None:
    events = []
    for n in range(400):
        events.append(impression(f"i{n}", n * 7.0))
        if n % 9 == 0:
            events.append(Click(impression_id=f"i{n}", event_time=n * 7.0 + 30))
    path = tmp_path / "stream.jsonl.gz"
    write_events(path, events)
    config = ReplayConfig(events=path, segment_by=["ad"])

    first, second = run_replay(config), run_replay(config)

    assert first.evaluation.report() == second.evaluation.report()
    assert first.timeline == second.timeline
    assert first.join_counts == second.join_counts
    assert first.label_counts == {"click": 45, "window_closed": 355}


def test_end_of_input_flushes_single_impression() -> None:
    result = Replay(ReplayConfig(events=Path("unused"))).replay([impression("i1", 0)])

    assert result.label_counts == {"window_closed": 1}
    assert result.join_counts[JoinOutcome.WINDOW_CLOSED] == 1


def test_invalid_lines_are_skipped_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "stream.jsonl"
    write_events(path, [impression("i1", 0)])
    with open(path, "ab") as handle:
        handle.write(b'{"type": "click", "impression_id": ""}\nnot json\n')

    result = run_replay(ReplayConfig(events=path))

    assert [line.line_number for line in result.invalid_lines] == [2, 3]
    assert result.impressions == 1


def test_served_notices_rejected_in_replay() -> None:
    with pytest.raises(ValueError, match="join.emit_served is for the live joiner"):
        ReplayConfig(events=Path("unused"), join={"emit_served": True})
