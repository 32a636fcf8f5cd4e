"""Delayed-feedback correction: a naive short window against fake-negative calibration.

Each setting replays the same stream with the same attribution window and
differs in how the model treats labels that come late:

- ``none``, late clicks dropped: the naive short window. Each impression is
  learned once, when its window decides it, and a click after the window is lost.
- ``none``, late clicks corrected: a click after the window is learned as an
  extra positive, after the impression was already learned as a negative.
- ``fake_negative``, late clicks dropped: every impression is learned as a
  negative when served, and only the clicks inside the window are learned.
- ``fake_negative``, late clicks corrected: every impression is learned as a
  negative when served, and every click when it comes (Ktena et al., RecSys
  2019), which is what the calibration assumes.

The replay's own metrics use the window's labels, which miss the late clicks.
This script also judges the served scores against the eventual label: whether
the impression has a click anywhere in the stream. On a generated stream it
also compares the predicted clicks with the sum of the true probabilities.
"Second half" leaves out impressions in the first half of the stream's event
time, where the delay tail of the first impressions has not arrived yet.

Usage:
  python bench/delayed_feedback.py --events taobao.jsonl.gz --window 10m
  python bench/delayed_feedback.py --generate 1000000 --window 10m
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import time
from pathlib import Path

import numpy as np

from shared.durations import parse_duration
from shared.events import LabeledExample, LabelSource
from shared.join import JoinSettings, LateClickPolicy
from shared.learn.learner import DelayedFeedback
from shared.metrics.binary import PROBABILITY_EPSILON, binary_entropy, roc_auc
from shared.replay.runner import ReplayConfig, run_replay
from shared.streams.generate import GeneratorSettings, LognormalDelay, read_truth, write_generated
from shared.streams.recorded import read_events

SETTINGS: tuple[tuple[DelayedFeedback, LateClickPolicy], ...] = (
    ("none", LateClickPolicy.DROP),
    ("none", LateClickPolicy.CORRECT),
    ("fake_negative", LateClickPolicy.DROP),
    ("fake_negative", LateClickPolicy.CORRECT),
)


@dataclasses.dataclass(frozen=True)
class Row:
    """One setting's served scores, judged by the window's labels and by the eventual ones."""

    delayed_feedback: str
    late_clicks: str
    window_normalized_entropy: float | None
    window_calibration: float | None
    normalized_entropy: float | None
    calibration: float | None
    auc: float | None
    second_half_normalized_entropy: float | None
    second_half_calibration: float | None
    true_calibration: float | None
    wall_seconds: float


def eventual_clicks(path: Path) -> set[str]:
    """Return the ids of the impressions that have a click anywhere in the stream."""
    return {event.impression_id for event in read_events(path) if event.type == "click"}


def normalized_entropy(scores: np.ndarray, labels: np.ndarray) -> float | None:
    clamped = np.clip(scores, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    entropy = binary_entropy(float(labels.mean())) if len(labels) else 0.0
    if entropy == 0.0:
        return None
    return float(-np.where(labels > 0, np.log(clamped), np.log1p(-clamped)).mean() / entropy)


def calibration(scores: np.ndarray, labels: np.ndarray) -> float | None:
    positives = labels.sum()
    return float(scores.sum() / positives) if positives else None


def replay_setting(
    events: Path,
    window_seconds: float,
    retention_seconds: float,
    delayed_feedback: DelayedFeedback,
    late_clicks: LateClickPolicy,
    clicked: set[str],
    true_probability: dict[str, float] | None,
) -> Row:
    """Replay the stream with one setting and judge its served scores."""
    evaluated: list[str] = []

    def record(example: LabeledExample) -> None:
        # The served-score metrics leave corrections out, and so does this list.
        if example.label_source != LabelSource.LATE_CLICK_CORRECTION:
            evaluated.append(example.impression.impression_id)

    config = ReplayConfig(
        events=events,
        delayed_feedback=delayed_feedback,
        join=JoinSettings(
            window_seconds=window_seconds,
            late_click_policy=late_clicks,
            closed_retention_seconds=retention_seconds,
        ),
    )
    started = time.perf_counter()
    result = run_replay(config, on_example=record)
    wall_seconds = time.perf_counter() - started

    served = result.evaluation.report()["served"]["model"]
    scores, _ = result.evaluation.served["model"].scores_and_labels()
    if len(scores) != len(evaluated):
        raise RuntimeError(
            f"{len(scores):,} served scores but {len(evaluated):,} evaluated examples; the "
            "stream has impressions without a served score (repeated impression ids?)"
        )
    labels = np.array([impression_id in clicked for impression_id in evaluated], dtype=np.int8)
    times = np.frombuffer(result.evaluated_times)
    middle = (times.min() + times.max()) / 2.0
    second_half = times >= middle

    true_calibration = None
    if true_probability is not None:
        expected = sum(true_probability[impression_id] for impression_id in evaluated)
        true_calibration = float(scores.sum() / expected)
    return Row(
        delayed_feedback=delayed_feedback,
        late_clicks=late_clicks.value,
        window_normalized_entropy=served["normalized_entropy"],
        window_calibration=served["calibration"],
        normalized_entropy=normalized_entropy(scores, labels),
        calibration=calibration(scores, labels),
        auc=roc_auc(scores, labels),
        second_half_normalized_entropy=normalized_entropy(scores[second_half], labels[second_half]),
        second_half_calibration=calibration(scores[second_half], labels[second_half]),
        true_calibration=true_calibration,
        wall_seconds=wall_seconds,
    )


def _number(value: float | None, decimals: int) -> str:
    return "n/a" if value is None else f"{value:.{decimals}f}"


def markdown_table(rows: list[Row], with_truth: bool) -> str:
    """Render the rows as the Markdown table of docs/benchmarks.md."""
    headers = [
        "delayed feedback",
        "late clicks",
        "NE",
        "calibration",
        "AUC",
        "NE, second half",
        "calibration, second half",
        "window labels: NE",
        "window labels: calibration",
    ]
    if with_truth:
        headers.append("predicted / true clicks")
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    for row in rows:
        cells = [
            f"`{row.delayed_feedback}`",
            row.late_clicks,
            _number(row.normalized_entropy, 4),
            _number(row.calibration, 3),
            _number(row.auc, 4),
            _number(row.second_half_normalized_entropy, 4),
            _number(row.second_half_calibration, 3),
            _number(row.window_normalized_entropy, 4),
            _number(row.window_calibration, 3),
        ]
        if with_truth:
            cells.append(_number(row.true_calibration, 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def generate_stream(impressions: int, directory: Path) -> tuple[Path, dict[str, float]]:
    """Write a stream with a long click-delay tail, and return its path and true probabilities."""
    settings = GeneratorSettings(
        seed=11,
        impressions=impressions,
        impressions_per_second=20.0,
        base_click_rate=0.05,
        # Median 10 minutes; p90 about 68 minutes and p99 about 5.5 hours.
        delay=LognormalDelay(median_seconds=600.0, sigma=1.5),
        start_time=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    )
    events = directory / f"long-tail-{impressions}.jsonl.gz"
    truth_path = directory / f"long-tail-{impressions}-truth.jsonl.gz"
    write_generated(settings, events, truth_path)
    truth = {record.impression_id: record.true_probability for record in read_truth(truth_path)}
    return events, truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--events", type=Path, help="recorded stream, .jsonl or .jsonl.gz")
    source.add_argument(
        "--generate", type=int, metavar="N", help="generate N impressions with long click delays"
    )
    parser.add_argument(
        "--window", type=parse_duration, default=600.0, help="attribution window (default: 10m)"
    )
    parser.add_argument(
        "--retention",
        type=parse_duration,
        default=86_400.0,
        help="how long after its window a late click is still corrected (default: 1d)",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=Path("/tmp"), help="where a generated stream is written"
    )
    args = parser.parse_args()

    true_probability = None
    events = args.events
    if args.generate is not None:
        events, true_probability = generate_stream(args.generate, args.work_dir)
    clicked = eventual_clicks(events)

    rows = []
    for delayed_feedback, late_clicks in SETTINGS:
        row = replay_setting(
            events,
            args.window,
            args.retention,
            delayed_feedback,
            late_clicks,
            clicked,
            true_probability,
        )
        print(f"{delayed_feedback}, late clicks {late_clicks.value}: {row.wall_seconds:.1f} s")
        rows.append(row)
    print(f"\n{events}: {len(clicked):,} impressions with a click")
    print(markdown_table(rows, with_truth=true_probability is not None))


if __name__ == "__main__":
    main()
