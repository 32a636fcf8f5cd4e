"""Attribution-window what-if: known click delays, recommendation, report and real data."""

from __future__ import annotations

import gzip
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from shared.metrics.binary import BinaryReport
from shared.replay.experiments import windows
from shared.replay.experiments.windows import (
    CDF_PLOT,
    WhatIfResult,
    WindowOutcome,
    run_what_if,
    what_if_config,
)
from shared.replay.report import INDEX_FILE, METRICS_FILE, write_report
from shared.replay.runner import ReplayConfig, run_replay
from shared.replay.summary import SUMMARY_WIDTH, format_summary
from shared.streams.generate import (
    ExponentialDelay,
    GeneratorSettings,
    TruthRecord,
    read_truth,
    write_generated,
)

REPO = Path(__file__).resolve().parents[3]
OBD_SAMPLE = REPO / "data" / "samples" / "obd-small.jsonl.gz"
MEAN_DELAY_SECONDS = 300.0
# Windows around the mean delay: most clicks missed, some, almost none.
WINDOWS = [60.0, 300.0, 900.0]
# A retention far beyond any drawn delay, so the join recognises every late click.
LONG_RETENTION_SECONDS = 1e7


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[TruthRecord]]:
    directory = tmp_path_factory.mktemp("windows")
    settings = GeneratorSettings(
        seed=11,
        impressions=10_000,
        impressions_per_second=10.0,
        delay=ExponentialDelay(mean_seconds=MEAN_DELAY_SECONDS),
    )
    events = directory / "stream.jsonl.gz"
    truth_path = directory / "truth.jsonl"
    write_generated(settings, events, truth_path)
    return events, read_truth(truth_path)


def config_for(events: Path, **join: float) -> ReplayConfig:
    return ReplayConfig(
        events=events,
        model="prior",
        join={"window_seconds": WINDOWS[1], **join},
        what_if_windows=WINDOWS,
    )


@pytest.fixture(scope="module")
def long_retention(generated) -> WhatIfResult:
    events, _ = generated
    config = config_for(events, closed_retention_seconds=LONG_RETENTION_SECONDS)
    return run_what_if(config, events)


@pytest.fixture(scope="module")
def default_retention(generated) -> WhatIfResult:
    events, _ = generated
    return run_what_if(config_for(events), events)


def truth_delays(truth: list[TruthRecord]) -> np.ndarray:
    return np.array([r.click_delay_seconds for r in truth if r.click_delay_seconds is not None])


def test_missed_share_matches_exponential_delays(generated, long_retention) -> None:
    _, truth = generated
    what_if = long_retention

    delivered = truth_delays(truth)
    assert what_if.matched_clicks == delivered.size
    assert [outcome.window_seconds for outcome in what_if.windows] == WINDOWS
    for outcome in what_if.windows:
        window = outcome.window_seconds
        expected = math.exp(-window / MEAN_DELAY_SECONDS)
        standard_error = math.sqrt(expected * (1 - expected) / outcome.matched_clicks)
        measured = outcome.missed_click_share
        assert abs(measured - expected) <= 4 * standard_error, (window, measured, expected)
        assert outcome.missed_clicks == int(np.count_nonzero(delivered > window)), window


def test_join_late_clicks_match_stream_delays(long_retention) -> None:
    for outcome in long_retention.windows:
        assert outcome.join_late_clicks == outcome.missed_clicks, outcome.window_seconds
        assert outcome.missed_after_retention == 0, outcome.window_seconds


def test_every_late_click_flips_one_negative(generated, default_retention) -> None:
    _, truth = generated
    for outcome in default_retention.windows:
        caught = outcome.matched_clicks - outcome.missed_clicks
        assert outcome.fake_negatives == outcome.missed_clicks, outcome.window_seconds
        assert outcome.negatives == len(truth) - caught, outcome.window_seconds
        assert outcome.fake_negative_share == outcome.missed_clicks / outcome.negatives


def test_default_retention_turns_late_into_orphans(generated, default_retention) -> None:
    events, truth = generated
    what_if = default_retention

    delivered = truth_delays(truth)
    lateness = config_for(events).join.allowed_lateness_seconds
    for outcome in what_if.windows:
        window = outcome.window_seconds
        assert outcome.retention_seconds == window
        beyond = int(np.count_nonzero(delivered >= 2 * window + lateness))
        assert outcome.missed_after_retention == beyond, window
        assert outcome.join_late_clicks == outcome.missed_clicks - beyond, window
        assert outcome.join_unexplained == 0, window
    assert what_if.windows[0].missed_after_retention > 0


def test_label_delays_match_truth(generated, default_retention) -> None:
    _, truth = generated
    expected = np.sort(truth_delays(truth))
    assert default_retention.delays.shape == expected.shape
    assert np.allclose(default_retention.delays, expected, rtol=0, atol=1e-5)


def test_main_window_matches_main_replay(generated, default_retention) -> None:
    events, _ = generated
    config = config_for(events)
    main = run_replay(config)

    [outcome] = [outcome for outcome in default_retention.windows if outcome.main]
    assert outcome.window_seconds == config.join.window_seconds
    assert outcome.served == main.evaluation.served["model"].report()


# Recommendation.

EMPTY_REPORT = BinaryReport(0, 0, None, None, None, None, None)


def outcome(window: float, missed: int, matched: int = 100) -> WindowOutcome:
    return WindowOutcome(
        window_seconds=window,
        retention_seconds=window,
        main=False,
        matched_clicks=matched,
        missed_clicks=missed,
        join_late_clicks=missed,
        missed_after_retention=0,
        negatives=1000,
        fake_negatives=missed,
        served=EMPTY_REPORT,
        served_final=EMPTY_REPORT,
    )


def what_if_of(outcomes: list[WindowOutcome], maximum: float = 0.05) -> WhatIfResult:
    matched = outcomes[0].matched_clicks
    return WhatIfResult(
        model="prior",
        main_window_seconds=outcomes[0].window_seconds,
        max_missed_click_share=maximum,
        windows=outcomes,
        delays=np.zeros(matched),
        impressions=1000,
        unmatched_clicks=0,
        clicks_before_impression=0,
        invalid_lines=0,
    )


def test_recommendation_picks_smallest_qualifying() -> None:
    what_if = what_if_of([outcome(60, 50), outcome(600, 4), outcome(3600, 1)])

    assert what_if.recommended is what_if.windows[1]
    assert what_if.recommendation().startswith("Recommended window: 10.0 min, the smallest")


def test_recommendation_accepts_share_at_maximum() -> None:
    what_if = what_if_of([outcome(60, 6), outcome(600, 5)])

    assert what_if.recommended is what_if.windows[1]


def test_recommendation_says_when_none_qualifies() -> None:
    what_if = what_if_of([outcome(60, 50), outcome(600, 20)])

    assert what_if.recommended is None
    text = what_if.recommendation()
    assert text.startswith("No window qualifies: even the longest, 10.0 min, misses 20.000 %")
    assert "Try longer windows" in text


def test_recommendation_without_matched_clicks() -> None:
    what_if = what_if_of([outcome(60, 0, matched=0), outcome(600, 0, matched=0)])

    assert what_if.recommended is None
    assert what_if.recommendation().startswith("No window recommended")


# Configuration of each window's replay.


def test_what_if_config_scales_default_retention(tmp_path: Path) -> None:
    config = ReplayConfig(
        events=tmp_path / "x", compare=["logreg"], freshness=True, what_if_windows=WINDOWS
    )

    copy = what_if_config(config, 60.0)

    assert copy.join.window_seconds == 60.0
    assert copy.join.retention_seconds == 60.0
    assert copy.compare == []
    assert copy.freshness is False
    assert copy.what_if_windows == []
    assert config.join.window_seconds == 600.0


def test_what_if_config_keeps_set_retention(tmp_path: Path) -> None:
    config = ReplayConfig(events=tmp_path / "x", join={"closed_retention_seconds": 5.0})

    assert what_if_config(config, 60.0).join.retention_seconds == 5.0


def test_run_what_if_rejects_no_windows(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="what_if_windows is empty"):
        run_what_if(ReplayConfig(events=tmp_path / "x"), tmp_path / "x")


# Summary and report.


@pytest.fixture(scope="module")
def small_stream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small") / "stream.jsonl.gz"
    settings = GeneratorSettings(
        seed=5, impressions=3_000, delay=ExponentialDelay(mean_seconds=120)
    )
    write_generated(settings, path)
    return path


def test_sections_are_empty_without_what_if(small_stream: Path, tmp_path: Path) -> None:
    result = run_replay(ReplayConfig(events=small_stream, model="prior"))

    assert windows.summary_lines(result) == []
    assert windows.html_section(result, tmp_path) == ""
    assert windows.document(result) is None
    assert not (tmp_path / CDF_PLOT).exists()


def test_report_shows_what_if(small_stream: Path, tmp_path: Path) -> None:
    config = config_for(small_stream)
    result = run_replay(config)
    result.what_if = run_what_if(config, small_stream)

    summary = format_summary(result)
    index = write_report(result, tmp_path)

    assert "Attribution-window what-if" in summary
    assert "Recommended window" in summary or "No window qualifies" in summary
    assert all(len(line) <= SUMMARY_WIDTH for line in summary.splitlines())
    page = index.read_text(encoding="utf-8")
    assert "<h2>Attribution-window what-if</h2>" in page
    assert "<th>missed share</th>" in page
    assert f'<img src="{CDF_PLOT}"' in page
    assert (tmp_path / CDF_PLOT).read_bytes().startswith(b"\x89PNG")
    document = json.loads((tmp_path / METRICS_FILE).read_text())["experiments"]["windows"]
    assert [item["window_seconds"] for item in document["windows"]] == WINDOWS
    assert document["recommendation"] == result.what_if.recommendation()
    assert index == tmp_path / INDEX_FILE


# Real data.


def test_obd_sample_misses_no_clicks(tmp_path: Path) -> None:
    # Open Bandit clicks carry their impression's timestamp, so no window misses any.
    events = tmp_path / "obd-head.jsonl.gz"
    with gzip.open(OBD_SAMPLE, "rb") as source, gzip.open(events, "wb") as target:
        target.writelines(itertools.islice(source, 6_000))
    config = ReplayConfig(
        events=events, join={"window_seconds": 60.0}, what_if_windows=[60.0, 600.0, 3600.0]
    )

    what_if = run_what_if(config, events)

    assert what_if.matched_clicks > 0
    assert not what_if.delays.any()
    for outcome in what_if.windows:
        assert outcome.missed_click_share == 0.0, outcome.window_seconds
        assert outcome.fake_negatives == 0, outcome.window_seconds
        assert outcome.join_late_clicks == 0, outcome.window_seconds
        assert outcome.served.count > 0, outcome.window_seconds
    assert what_if.recommended is what_if.windows[0]
