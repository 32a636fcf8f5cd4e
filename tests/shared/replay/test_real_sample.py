"""The bundled real sample through every evaluation feature at once, from the command line."""

from __future__ import annotations

import gzip
import itertools
import json
import re
from pathlib import Path

import pytest

from shared.cli import main
from shared.replay.experiments import sections
from shared.replay.report import CONFIG_FILE, INDEX_FILE, METRICS_FILE

SAMPLE = Path(__file__).parents[3] / "data" / "samples" / "obd-small.jsonl.gz"
# The first 8,000 lines: 15 hours of event time, 41 clicks.
HEAD_LINES = 8000
HEADINGS = (
    "Success targets",
    "Slices",
    "Offline A/B",
    "Online model selection",
    "Freshness",
    "Attribution-window what-if",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("real-sample")
    stream = directory / "obd-head.jsonl"
    with gzip.open(SAMPLE, "rt", encoding="utf-8") as sample:
        stream.write_text("".join(itertools.islice(sample, HEAD_LINES)), encoding="utf-8")

    argv = [
        "replay",
        "--events", str(stream),
        "--report", str(directory / "report"),
        "--no-progress",
        "--target", "normalized_entropy<=1.05",
        "--target", "auc>=0.99",
        "--holdout-from", "2019-11-24T06:00:00Z",
        "--segment-by", "position",
        "--slice-min-count", "100",
        "--compare", "logreg",
        "--compare", "select",
        "--bootstrap-samples", "200",
        "--freshness",
        "--freeze-at", "2019-11-24T04:00:00Z",
        "--retrain-every", "2h",
        "--window", "10m",
        "--window", "1h",
    ]  # fmt: skip
    assert main(argv) == 0
    return directory / "report"


def test_every_experiment_in_metrics(report: Path) -> None:
    metrics = json.loads((report / METRICS_FILE).read_text(encoding="utf-8"))

    assert set(metrics["experiments"]) == {section.NAME for section in sections()}


def test_every_experiment_in_page(report: Path) -> None:
    page = (report / INDEX_FILE).read_text(encoding="utf-8")

    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page, heading
    for image in re.findall(r'<img src="([^"]+)"', page):
        assert (report / image).is_file(), image
    assert page.count("<figcaption>") >= 6


def test_targets_judged_on_holdout(report: Path) -> None:
    metrics = json.loads((report / METRICS_FILE).read_text(encoding="utf-8"))
    served = metrics["evaluation"]["served"]["model"]

    assert 0 < served["count"] < HEAD_LINES
    assert metrics["experiments"]["targets"]["all_met"] is False


def test_config_reproduces_settings(report: Path) -> None:
    config = json.loads((report / CONFIG_FILE).read_text(encoding="utf-8"))

    assert config["compare"] == ["logreg", "select"]
    assert config["what_if_windows"] == [600.0, 3600.0]
    assert config["freshness"] is True
