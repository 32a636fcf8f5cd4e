"""Time holdout: only impressions at or after the holdout time are evaluated, learning may stop."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from shared.events import Click, Impression
from shared.join import JoinSettings
from shared.learn.learner import OnlineLearner
from shared.replay.report import write_report
from shared.replay.runner import Replay, ReplayConfig, ReplayResult
from shared.replay.summary import SUMMARY_WIDTH, format_summary
from shared.streams.generate import ExponentialDelay, GeneratorSettings, TruthRecord, generate

SETTINGS = GeneratorSettings(
    seed=7,
    impressions=3_000,
    impressions_per_second=5.0,
    base_click_rate=0.1,
    delay=ExponentialDelay(mean_seconds=20.0),
)
HOLDOUT_FROM = SETTINGS.start_time + dt.timedelta(seconds=200)
JOIN = JoinSettings(window_seconds=60.0, allowed_lateness_seconds=60.0)
# The last label of an impression served before the holdout time is decided by then.
LAST_EARLY_LABEL = HOLDOUT_FROM + dt.timedelta(seconds=JOIN.window_seconds + 60.0)
# Impressions with the same features whose scores show whether the model still
# learns: one just after the holdout time and two after every earlier label.
PROBE_TIMES = (
    HOLDOUT_FROM + dt.timedelta(seconds=1.5),
    LAST_EARLY_LABEL + dt.timedelta(seconds=80.5),
    LAST_EARLY_LABEL + dt.timedelta(seconds=260.5),
)


def generated() -> tuple[list[Impression | Click], list[TruthRecord]]:
    events, truth = generate(SETTINGS)
    return list(events), truth


def probe(number: int, like: Impression) -> Impression:
    return Impression(
        impression_id=f"probe-{number}",
        event_time=PROBE_TIMES[number],
        user_id=like.user_id,
        item_id=like.item_id,
        features=like.features,
    )


def with_probes(events: list[Impression | Click]) -> tuple[list[Impression | Click], Impression]:
    like = next(event for event in events if event.type == "impression")
    probes = [probe(number, like) for number in range(len(PROBE_TIMES))]
    # A stable sort keeps the generated order and puts each probe at its time.
    merged = sorted([*events, *probes], key=lambda event: event.ts)
    return merged, probes[0]


def replay(
    events: list[Impression | Click], after_holdout: str = "learn", **settings
) -> ReplayResult:
    config = ReplayConfig(
        events=Path("unused"),
        join=JOIN,
        holdout_from=HOLDOUT_FROM,
        after_holdout=after_holdout,
        **settings,
    )
    return Replay(config).replay(events)


def probe_scores(result: ReplayResult, arm: str) -> list[float]:
    """Return the served scores of the probes, found by their unique impression times."""
    scores, _ = result.evaluation.served[arm].scores_and_labels()
    times = np.frombuffer(result.evaluated_times)
    found = []
    for moment in PROBE_TIMES:
        positions = np.flatnonzero(times == moment.timestamp())
        assert len(positions) == 1, moment
        found.append(float(scores[positions[0]]))
    return found


@pytest.fixture(scope="module")
def stream() -> tuple[list[Impression | Click], list[TruthRecord]]:
    return generated()


def test_holdout_evaluates_only_later_impressions(stream) -> None:
    events, truth = stream
    cut = HOLDOUT_FROM.timestamp()
    impressions = [event for event in events if event.type == "impression"]
    later = [event for event in impressions if event.ts >= cut]
    truth_by_id = {record.impression_id: record for record in truth}
    later_clicks = sum(
        1
        for event in later
        if (delay := truth_by_id[event.impression_id].click_delay_seconds) is not None
        and delay < JOIN.window_seconds
    )

    result = replay(events, compare=["prior"])

    assert 0 < len(later) < len(impressions)
    for metrics in (
        result.evaluation.served["model"],
        result.evaluation.served["baseline"],
        result.arm("prior").learner.evaluation.served["model"],
    ):
        assert metrics.count == len(later)
        assert metrics.positives == later_clicks
    assert len(result.evaluated_times) == len(later)
    assert min(result.evaluated_times) >= cut
    assert result.examples_before_holdout == len(impressions) - len(later)


def test_freeze_stops_learning_after_holdout(stream) -> None:
    events, _ = stream
    merged, first_probe = with_probes(events)

    result = replay(merged, after_holdout="freeze")

    model = probe_scores(result, "model")
    baseline = probe_scores(result, "baseline")
    assert model[1] == model[2]
    assert baseline[1] == baseline[2]
    # Labels of impressions served before the holdout time are still learned as they come.
    assert model[0] != model[1]
    assert baseline[0] != baseline[1]
    # Learning before the holdout time ran: the frozen model is not the untrained one.
    untrained = OnlineLearner(delayed_feedback="fake_negative").score(first_probe)
    assert model[1] != pytest.approx(untrained.model, rel=1e-3)
    assert baseline[1] != pytest.approx(untrained.baseline, rel=1e-3)


def test_learn_continues_after_holdout(stream) -> None:
    events, _ = stream
    merged, _ = with_probes(events)

    result = replay(merged, after_holdout="learn")

    model = probe_scores(result, "model")
    baseline = probe_scores(result, "baseline")
    assert model[1] != model[2]
    assert baseline[1] != baseline[2]


def test_summary_and_report_describe_holdout(stream, tmp_path: Path) -> None:
    events, _ = stream
    result = replay(events, after_holdout="freeze")
    evaluated = f"{len(result.evaluated_times):,} examples evaluated"
    learned = f"{result.examples_before_holdout:,} learned before it"

    summary = format_summary(result)

    assert "  holdout           from 2024-01-01T00:03:20.000Z, learning after it: stops" in summary
    assert f"{evaluated}, {learned}" in summary
    assert "evaluated examples have no pre-learn scores" in summary
    for line in summary.splitlines():
        assert len(line) <= SUMMARY_WIDTH, line
    html_text = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert (
        "<tr><th>holdout</th><td>from 2024-01-01T00:03:20.000Z, learning after it: stops; "
        f"{evaluated}, {learned}</td></tr>"
    ) in html_text


def test_no_holdout_no_line() -> None:
    events, _ = generate(SETTINGS.model_copy(update={"impressions": 100}))
    result = Replay(ReplayConfig(events=Path("unused"))).replay(events)

    assert result.examples_before_holdout == 0
    summary = format_summary(result)
    assert "holdout" not in summary
    assert "no pre-learn scores" not in summary
