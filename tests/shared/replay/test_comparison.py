"""Offline A/B and model-selection sections of a replay with several arms."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from shared.events import Click, Impression
from shared.learn.models import build_select
from shared.learn.sampling import FakeNegativeCalibrated
from shared.replay.experiments import comparison, selection
from shared.replay.report import INDEX_FILE, METRICS_FILE, write_report
from shared.replay.runner import Replay, ReplayConfig, ReplayResult
from shared.replay.summary import SUMMARY_WIDTH, format_summary
from shared.streams.generate import GeneratorSettings, generate

# 2,000 impressions at 10 per second: 200 seconds of event time.
STREAM = GeneratorSettings(seed=3, impressions=2_000, item_effect_sd=1.0, base_click_rate=0.08)


def stream() -> list[Impression | Click]:
    events, _ = generate(STREAM)
    return list(events)


def replay(**settings: object) -> ReplayResult:
    config = ReplayConfig(events=Path("unused"), bootstrap_samples=200, **settings)
    return Replay(config).replay(stream())


def test_compare_logreg_appears_in_summary_and_report(tmp_path: Path) -> None:
    result = replay(compare=["logreg"])

    summary = format_summary(result)
    write_report(result, tmp_path)

    assert "Offline A/B against ctr: paired bootstrap, 200 resamples" in summary
    assert "logreg  log loss" in summary
    index = (tmp_path / INDEX_FILE).read_text(encoding="utf-8")
    assert "<h2>Offline A/B</h2>" in index
    assert f'src="{comparison.COMPARISON_PLOT}"' in index
    assert (tmp_path / comparison.COMPARISON_PLOT).stat().st_size > 0
    document = json.loads((tmp_path / METRICS_FILE).read_text())["experiments"]["comparison"]
    assert document["arms"] == ["ctr", "logreg"]
    assert set(document["differences"]["logreg"]) == {
        "log_loss",
        "normalized_entropy",
        "auc",
        "calibration_error",
    }


def test_comparison_values_match_served_metrics() -> None:
    result = replay(compare=["logreg"])

    found = comparison.compare(result)

    assert found is not None
    for arm in result.arms:
        served = arm.learner.evaluation.served["model"].report()
        assert found.values[arm.name]["log_loss"] == pytest.approx(served.log_loss)
        assert found.values[arm.name]["auc"] == pytest.approx(served.auc)
        assert found.values[arm.name]["calibration"] == pytest.approx(served.calibration)
    interval = found.rows["logreg"][0].difference
    assert interval.estimate == pytest.approx(
        found.values["logreg"]["log_loss"] - found.values["ctr"]["log_loss"]
    )
    assert interval.low <= interval.estimate <= interval.high


def test_arm_identical_to_main_is_not_significant() -> None:
    config = ReplayConfig(events=Path("unused"), compare=["logreg"], bootstrap_samples=200)
    runner = Replay(config)
    # Same model, same start: every served score of the second arm equals the first's.
    runner.arms[1].learner.model = copy.deepcopy(runner.arms[0].learner.model)

    result = runner.replay(stream())
    found = comparison.compare(result)

    assert found is not None
    for row in found.rows["logreg"]:
        assert row.difference.estimate == 0.0, row.metric.name
        assert row.difference.low == row.difference.high == 0.0, row.metric.name
        assert row.arm_better is None, row.metric.name
    assert "not significant" in "\n".join(comparison.summary_lines(result))


def test_labels_that_differ_name_both_arms() -> None:
    result = replay(compare=["logreg"])
    result.arms[1].learner.evaluation.served["model"].update(0.5, 1)

    with pytest.raises(ValueError, match="arm 'logreg'.*arm 'ctr'"):
        comparison.compare(result)


def test_without_compare_section_is_empty(tmp_path: Path) -> None:
    result = replay()

    assert comparison.summary_lines(result) == []
    assert comparison.html_section(result, tmp_path) == ""
    assert comparison.document(result) is None
    assert not (tmp_path / comparison.COMPARISON_PLOT).exists()


def test_freshness_arms_are_named_not_compared() -> None:
    result = replay(compare=["logreg"], freshness=True, retrain_every_seconds=60.0)

    found = comparison.compare(result)

    assert found is not None
    assert found.arms == ["ctr", "logreg"]
    assert list(found.rows) == ["logreg"]
    assert [schedule for _, schedule in found.not_compared] == ["frozen", "retrain"]
    summary = "\n".join(comparison.summary_lines(result))
    assert "ctr frozen (frozen)" in summary


def test_select_arm_reports_its_candidates(tmp_path: Path) -> None:
    result = replay(compare=["select"])

    summary = format_summary(result)
    write_report(result, tmp_path)

    assert "Model selection in arm select: successive halving by LogLoss" in summary
    assert "ctr alpha=0.03" in summary
    index = (tmp_path / INDEX_FILE).read_text(encoding="utf-8")
    assert "<h2>Online model selection</h2>" in index
    document = json.loads((tmp_path / METRICS_FILE).read_text())["experiments"]
    choices = document[selection.NAME]["select"]
    assert len(choices["candidates"]) == 4
    # Under fake negatives every served impression and every click is a learn call.
    assert choices["learn_calls"] == result.impressions + result.label_counts["click"]
    assert choices["predicting"] in {candidate["name"] for candidate in choices["candidates"]}


def test_selection_lines_fit_console_width() -> None:
    config = ReplayConfig(events=Path("unused"), compare=["select"], bootstrap_samples=200)
    runner = Replay(config)
    # A small budget puts both rungs inside the stream, so every rung column shows.
    runner.arms[1].learner.model = FakeNegativeCalibrated(build_select(budget=800))

    result = runner.replay(stream())
    lines = selection.summary_lines(result) + comparison.summary_lines(result)

    assert "at 100 calls" in lines[2]
    assert "at 200 calls" in lines[2]
    for line in lines:
        assert len(line) <= SUMMARY_WIDTH, line
        assert line == line.rstrip(), line


def test_no_select_arm_means_no_selection_section(tmp_path: Path) -> None:
    result = replay(compare=["logreg"])

    assert selection.summary_lines(result) == []
    assert selection.html_section(result, tmp_path) == ""
    assert selection.document(result) is None
