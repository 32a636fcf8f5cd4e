"""Replay report files: presence, JSON keys, byte-identical reruns, HTML escaping and edge cases."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pydantic
import pytest

from shared.errors import InvalidEventError
from shared.events import Click, Impression, LabelSource
from shared.join import JoinOutcome
from shared.replay.report import (
    CALIBRATION_PLOT,
    INDEX_FILE,
    LABEL_DELAY_PLOT,
    LOG_LOSS_PLOT,
    MAX_INVALID_LINES_LISTED,
    METRICS_FILE,
    NORMALIZED_ENTROPY_PLOT,
    TIMELINE_FILE,
    calibration_bins,
    wilson_interval,
    write_report,
)
from shared.replay.runner import Replay, ReplayConfig, ReplayResult
from shared.streams.recorded import InvalidLine

PLOTS = (NORMALIZED_ENTROPY_PLOT, LOG_LOSS_PLOT, CALIBRATION_PLOT, LABEL_DELAY_PLOT)
SCRIPT_AD = "<script>alert(1)</script>"
ADS = ("a", "b", SCRIPT_AD)
# Per-ad click probabilities: different enough for the model to learn something.
CLICK_PROBABILITIES = {"a": 0.3, "b": 0.05, SCRIPT_AD: 0.15}


def synthetic_events(
    impressions: int = 400, seed: int = 1, clicks: bool = True, click_delay_seconds: float = 30.0
) -> list[Impression | Click]:
    """Build impressions 5 s apart with per-ad click rates, each click after a random delay."""
    rng = random.Random(seed)
    timed: list[tuple[float, int, Impression | Click]] = []
    for n in range(impressions):
        event_time = n * 5.0
        ad = ADS[n % len(ADS)]
        impression = Impression(
            impression_id=f"i{n}", event_time=event_time, item_id=f"item-{ad}", features={"ad": ad}
        )
        timed.append((event_time, 0, impression))
        if clicks and rng.random() < CLICK_PROBABILITIES[ad]:
            delay = rng.expovariate(1.0 / click_delay_seconds) if click_delay_seconds else 0.0
            click_time = event_time + delay
            timed.append((click_time, 1, Click(impression_id=f"i{n}", event_time=click_time)))
    timed.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in timed]


def replay(events: list[Impression | Click]) -> ReplayResult:
    config = ReplayConfig(events=Path("unused"), segment_by=["ad"], timeline_every=50)
    return Replay(config).replay(events)


@pytest.fixture(scope="module")
def result() -> ReplayResult:
    return replay(synthetic_events())


def test_write_report_creates_every_file(result: ReplayResult, tmp_path: Path) -> None:
    index = write_report(result, tmp_path / "report")

    assert index == tmp_path / "report" / INDEX_FILE
    for name in (INDEX_FILE, METRICS_FILE, TIMELINE_FILE, *PLOTS):
        path = tmp_path / "report" / name
        assert path.is_file(), name
        assert path.stat().st_size > 0, name
    for name in PLOTS:
        assert (tmp_path / "report" / name).read_bytes().startswith(b"\x89PNG"), name


def test_metrics_json_keys(result: ReplayResult, tmp_path: Path) -> None:
    write_report(result, tmp_path)
    metrics = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))

    assert set(metrics) == {
        "config",
        "events",
        "invalid_lines",
        "event_time",
        "evaluation",
        "experiments",
        "join_outcomes",
        "label_sources",
        "positive_label_delay_seconds",
    }
    assert metrics["config"]["model"] == result.config.model
    assert metrics["config"]["segment_by"] == ["ad"]
    assert metrics["events"] == {
        "total": result.events,
        "impressions": 400,
        "clicks": result.clicks,
        "invalid_lines": 0,
    }
    assert metrics["event_time"]["first"] == "1970-01-01T00:00:00.000Z"
    assert metrics["event_time"]["first_seconds"] == 0.0
    assert metrics["event_time"]["span_seconds"] == result.last_event_time
    assert set(metrics["evaluation"]) == {
        "served",
        "prelearn",
        "rolling",
        "segments",
        "unserved_examples",
    }
    assert set(metrics["evaluation"]["segments"]["ad"]) == set(ADS)
    assert list(metrics["join_outcomes"]) == [outcome.value for outcome in JoinOutcome]
    # Served notices are not labels, and replay never makes them.
    labels = [source.value for source in LabelSource if source != LabelSource.SERVED]
    assert list(metrics["label_sources"]) == labels
    assert set(metrics["positive_label_delay_seconds"]) == {"count", "p50", "p90", "p99", "max"}
    assert metrics["positive_label_delay_seconds"]["count"] == len(result.positive_delays)


def test_metrics_json_has_no_wall_time(tmp_path: Path) -> None:
    result = replay(synthetic_events(impressions=60))
    result.wall_seconds = 12.345
    write_report(result, tmp_path)

    text = (tmp_path / METRICS_FILE).read_text(encoding="utf-8")

    assert "wall" not in text
    assert "12.345" not in text


def test_report_twice_is_byte_identical(result: ReplayResult, tmp_path: Path) -> None:
    write_report(result, tmp_path / "first")
    write_report(result, tmp_path / "second")
    write_report(replay(synthetic_events()), tmp_path / "rerun")

    for name in (METRICS_FILE, TIMELINE_FILE):
        first = (tmp_path / "first" / name).read_bytes()
        assert (tmp_path / "second" / name).read_bytes() == first, name
        assert (tmp_path / "rerun" / name).read_bytes() == first, name
    for name in PLOTS:
        png = (tmp_path / "first" / name).read_bytes()
        assert b"matplotlib" not in png, name
        assert (tmp_path / "second" / name).read_bytes() == png, name


def test_timeline_csv_rows(result: ReplayResult, tmp_path: Path) -> None:
    write_report(result, tmp_path)
    with open(tmp_path / TIMELINE_FILE, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))

    assert len(rows) == len(result.timeline)
    assert list(rows[0])[:3] == ["event_time_utc", "event_time", "examples"]
    assert "model_rolling_normalized_entropy" in rows[0]
    assert rows[0]["event_time_utc"].startswith("1970-01-01T")
    assert rows[0]["event_time_utc"].endswith("Z")
    assert float(rows[0]["event_time"]) == result.timeline[0]["event_time"]
    assert int(rows[-1]["examples"]) == result.timeline[-1]["examples"]


def test_html_links_plots_and_escapes(result: ReplayResult, tmp_path: Path) -> None:
    html_text = write_report(result, tmp_path).read_text(encoding="utf-8")

    for name in PLOTS:
        assert f'src="{name}"' in html_text, name
    assert SCRIPT_AD not in html_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html_text
    assert "<h3>ad</h3>" in html_text
    for outcome in JoinOutcome:
        assert f"<td>{outcome.value}</td>" in html_text, outcome


def test_report_without_positives(tmp_path: Path) -> None:
    result = replay(synthetic_events(clicks=False))

    index = write_report(result, tmp_path)

    metrics = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    served = metrics["evaluation"]["served"]["model"]
    assert served["positives"] == 0
    assert served["normalized_entropy"] is None
    assert served["auc"] is None
    assert metrics["positive_label_delay_seconds"]["p50"] is None
    assert "n/a" in index.read_text(encoding="utf-8")
    for name in PLOTS:
        assert (tmp_path / name).is_file(), name


def test_report_without_events(tmp_path: Path) -> None:
    result = replay([])

    write_report(result, tmp_path)

    metrics = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    assert metrics["events"]["total"] == 0
    assert metrics["event_time"]["first"] is None
    assert metrics["evaluation"]["served"]["model"]["count"] == 0
    for name in PLOTS:
        assert (tmp_path / name).is_file(), name


def test_report_with_zero_label_delays(tmp_path: Path) -> None:
    result = replay(synthetic_events(click_delay_seconds=0.0))
    assert result.positive_delays
    assert not any(result.positive_delays)

    write_report(result, tmp_path)

    metrics = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    assert metrics["positive_label_delay_seconds"]["max"] == 0.0
    assert (tmp_path / LABEL_DELAY_PLOT).is_file()


def test_metrics_json_lists_first_invalid_lines(tmp_path: Path) -> None:
    result = replay(synthetic_events(impressions=30))
    for line_number in range(1, 26):
        error = InvalidEventError(
            "event_time", "yesterday", "must be a date", code="datetime_parsing"
        )
        result.invalid_lines.append(InvalidLine(line_number, b'{"event_time": "yesterday"}', error))

    write_report(result, tmp_path)

    metrics = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    assert metrics["events"]["invalid_lines"] == 25
    assert len(metrics["invalid_lines"]) == MAX_INVALID_LINES_LISTED
    assert metrics["invalid_lines"][0]["line_number"] == 1
    assert metrics["invalid_lines"][0]["reason"] == "event_time:datetime_parsing"
    assert "yesterday" in metrics["invalid_lines"][0]["message"]


def test_infinite_lateness_rejected_up_front() -> None:
    with pytest.raises(pydantic.ValidationError):
        ReplayConfig(events=Path("unused"), join={"allowed_lateness_seconds": float("inf")})


def test_calibration_bins_equal_counts() -> None:
    rng = np.random.default_rng(3)
    scores = rng.uniform(0.0, 0.2, 1_050)
    labels = (rng.uniform(size=scores.size) < scores).astype(np.int8)

    bins = calibration_bins(scores, labels)

    assert len(bins) == 10
    assert sum(item.count for item in bins) == scores.size
    assert {item.count for item in bins} == {105}
    assert [item.mean_prediction for item in bins] == sorted(item.mean_prediction for item in bins)
    assert sum(item.observed_rate * item.count for item in bins) == pytest.approx(labels.sum())


def test_calibration_bins_few_examples() -> None:
    bins = calibration_bins(np.array([0.1, 0.2, 0.3]), np.array([0, 1, 0], dtype=np.int8))

    assert len(bins) == 1
    assert bins[0].count == 3
    assert bins[0].observed_rate == pytest.approx(1 / 3)


def test_wilson_interval_bounds() -> None:
    low, high = wilson_interval(0, 100)
    assert low == 0.0
    assert 0.0 < high < 0.05

    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high
    assert low == pytest.approx(0.2189, abs=1e-3)
    assert high == pytest.approx(0.3958, abs=1e-3)
