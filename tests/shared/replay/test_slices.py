"""Slices: flags, pooling of small segments, and the table in the summary, report and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from shared.metrics.binary import BinaryMetrics
from shared.replay.experiments import slices
from shared.replay.experiments.slices import (
    MISCALIBRATED,
    WORSE_THAN_BASELINE,
    is_miscalibrated,
    is_worse_than_baseline,
    pooled_label,
    row_flags,
    slice_rows,
)
from shared.replay.report import METRICS_FILE, write_report
from shared.replay.runner import Replay, ReplayConfig, ReplayResult
from shared.replay.summary import SUMMARY_WIDTH, format_summary
from shared.streams.generate import GeneratorSettings, generate


def metrics(probability: float, clicks: int, count: int) -> BinaryMetrics:
    """Build metrics of ``count`` examples scored ``probability``, the first ``clicks`` clicked."""
    built = BinaryMetrics()
    for index in range(count):
        built.update(probability, int(index < clicks))
    return built


def random_metrics(seed: int, count: int, click_rate: float, bias: float = 1.0) -> BinaryMetrics:
    """Build metrics of scores spread around the click rate, times ``bias``, with drawn labels."""
    rng = np.random.default_rng(seed)
    built = BinaryMetrics()
    for _ in range(count):
        probability = float(rng.uniform(0.5, 1.5) * click_rate)
        built.update(min(probability * bias, 0.99), int(rng.uniform() < probability))
    return built


def test_worse_than_baseline_flag() -> None:
    # 10 clicks in 100: predicting 0.1 is the best constant, predicting 0.3 is worse.
    exact = metrics(0.1, 10, 100).report()
    off = metrics(0.3, 10, 100).report()

    assert is_worse_than_baseline(off, exact)
    assert not is_worse_than_baseline(exact, off)
    assert not is_worse_than_baseline(exact, exact)
    assert row_flags(off, exact, tolerance=5.0) == (WORSE_THAN_BASELINE,)


def test_worse_than_baseline_undefined() -> None:
    no_clicks = metrics(0.1, 0, 100).report()

    assert no_clicks.normalized_entropy is None
    assert not is_worse_than_baseline(no_clicks, metrics(0.1, 10, 100).report())


def test_miscalibration_flag() -> None:
    # Calibration is predicted over observed clicks: 0.13 * 100 / 10 = 1.3.
    over = metrics(0.13, 10, 100).report()
    under = metrics(0.085, 10, 100).report()
    exact = metrics(0.1, 10, 100).report()

    assert over.calibration == pytest.approx(1.3)
    assert is_miscalibrated(over, tolerance=0.2)
    assert not is_miscalibrated(over, tolerance=0.35)
    assert is_miscalibrated(under, tolerance=0.1)
    assert not is_miscalibrated(under, tolerance=0.2)
    assert not is_miscalibrated(exact, tolerance=0.01)
    assert not is_miscalibrated(metrics(0.1, 0, 100).report(), tolerance=0.01)
    assert row_flags(over, over, tolerance=0.2) == (MISCALIBRATED,)
    assert row_flags(over, exact, tolerance=0.2) == (WORSE_THAN_BASELINE, MISCALIBRATED)


def test_small_segments_pooled() -> None:
    by_value = {
        "big": {"model": random_metrics(1, 600, 0.1), "baseline": random_metrics(2, 600, 0.1)},
        "bigger": {"model": random_metrics(3, 900, 0.1), "baseline": random_metrics(4, 900, 0.1)},
        "few": {"model": random_metrics(5, 40, 0.3), "baseline": random_metrics(6, 40, 0.3)},
        "fewer": {
            "model": random_metrics(7, 160, 0.05, bias=2.0),
            "baseline": random_metrics(8, 160, 0.05),
        },
    }

    rows = slice_rows(by_value, min_count=500, tolerance=0.2)

    assert [row.label for row in rows] == ["bigger", "big", pooled_label(500)]
    assert [row.values for row in rows] == [("bigger",), ("big",), ("few", "fewer")]
    assert [row.pooled for row in rows] == [False, False, True]
    pooled = rows[2].model
    few, fewer = by_value["few"]["model"], by_value["fewer"]["model"]
    assert pooled.count == 200
    assert pooled.positives == few.positives + fewer.positives
    assert pooled.log_loss == pytest.approx((few.loss_sum + fewer.loss_sum) / 200)
    assert pooled.calibration == pytest.approx(
        (few.prediction_sum + fewer.prediction_sum) / (few.positives + fewer.positives)
    )
    ratios = [part.report().normalized_entropy for part in (few, fewer)]
    assert pooled.normalized_entropy != pytest.approx(sum(ratios) / 2)
    assert rows[2].baseline.count == 200
    assert rows[2].flags == row_flags(rows[2].model, rows[2].baseline, 0.2)


def test_no_small_segments_no_pooled_row() -> None:
    by_value = {"a": {"model": metrics(0.1, 10, 100), "baseline": metrics(0.1, 10, 100)}}

    rows = slice_rows(by_value, min_count=100, tolerance=0.2)

    assert [row.label for row in rows] == ["a"]
    assert rows[0].flags == ()


def replay(**settings) -> ReplayResult:
    events, _ = generate(
        GeneratorSettings(seed=11, impressions=3_000, categories=12, base_click_rate=0.1)
    )
    config = ReplayConfig(
        events=Path("unused"), segment_by=["category", "user_segment"], **settings
    )
    return Replay(config).replay(events)


@pytest.fixture(scope="module")
def result() -> ReplayResult:
    return replay(slice_min_count=250)


def test_report_slices_table(result: ReplayResult, tmp_path: Path) -> None:
    segments = result.evaluation.segments["category"]
    small = sorted(value for value, arms in segments.items() if arms["model"].count < 250)
    large = [value for value, arms in segments.items() if arms["model"].count >= 250]
    assert small
    assert large

    index = write_report(result, tmp_path)

    metrics_json = json.loads((tmp_path / METRICS_FILE).read_text(encoding="utf-8"))
    assert set(metrics_json["evaluation"]["segments"]["category"]) == set(segments)
    document = metrics_json["experiments"]["slices"]
    assert document["min_count"] == 250
    rows = document["features"]["category"]
    assert len(rows) == len(large) + 1
    assert rows[-1]["value"] == "(fewer than 250 each)"
    assert rows[-1]["values"] == small
    assert rows[-1]["model"]["count"] == sum(segments[value]["model"].count for value in small)
    assert sum(row["model"]["count"] for row in rows) == result.evaluation.served["model"].count
    flagged = [
        {"feature": feature, "value": row["value"], "flags": row["flags"]}
        for feature, feature_rows in document["features"].items()
        for row in feature_rows
        if row["flags"]
    ]
    assert document["flagged"] == flagged
    html_text = index.read_text(encoding="utf-8")
    assert "<h2>Slices</h2>" in html_text
    assert "<h3>category</h3>" in html_text
    assert "<h3>user_segment</h3>" in html_text
    assert "<td>(fewer than 250 each)</td>" in html_text
    assert f"pools {len(small)} values: {', '.join(small)}." in html_text
    assert "<h2>Segments</h2>" not in html_text


def test_worse_segment_flagged_everywhere(tmp_path: Path) -> None:
    result = replay(slice_min_count=250)
    segments = result.evaluation.segments["user_segment"]
    value = max(segments, key=lambda key: segments[key]["model"].count)
    # Perfect baseline scores in one segment make the model worse than the baseline there.
    perfect = BinaryMetrics()
    for _ in range(300):
        perfect.update(1.0, 1)
        perfect.update(0.0, 0)
    segments[value]["baseline"] = perfect

    html_text = write_report(result, tmp_path).read_text(encoding="utf-8")

    assert f'<tr class="worse"><td>{value}</td>' in html_text
    flagged = {
        (item["feature"], item["value"]): item["flags"]
        for item in slices.document(result)["flagged"]
    }
    assert WORSE_THAN_BASELINE in flagged[("user_segment", value)]
    summary = format_summary(result)
    assert "user_segment: " in summary
    assert f"    {value}" in summary
    assert "> baseline 0.0000" in summary


def test_tight_tolerance_flags_miscalibration() -> None:
    result = replay(slice_min_count=250, calibration_tolerance=1e-6)

    rows = slices.feature_rows(result)["user_segment"]

    assert rows
    for row in rows:
        assert MISCALIBRATED in row.flags, row.label


def test_summary_lists_flagged_rows(result: ReplayResult) -> None:
    summary = format_summary(result)

    assert "Slices (flagged: NE above baseline prior, or |calibration - 1| > 0.2)" in summary
    for feature, rows in slices.feature_rows(result).items():
        flagged = sum(1 for row in rows if row.flags)
        assert f"  {feature}: {flagged} of {len(rows)} rows flagged" in summary
    for line in summary.splitlines():
        assert len(line) <= SUMMARY_WIDTH, line


def test_no_segments_no_section() -> None:
    events, _ = generate(GeneratorSettings(seed=11, impressions=100))
    result = Replay(ReplayConfig(events=Path("unused"))).replay(events)

    assert slices.summary_lines(result) == []
    assert slices.html_section(result, Path("unused")) == ""
    assert slices.document(result) is None
