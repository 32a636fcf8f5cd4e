"""Freshness: does learning in real time pay off?

With ``freshness`` the replay runs three schedules of the same model on the
same examples (see :mod:`shared.replay.arms`). The main arm learns online
all the time. One copy is frozen at ``freeze_at``. The other is frozen at
the same time and then rebuilt from scratch on every label decided so far,
once per ``retrain_every_seconds``. Until the freeze the three are the same
model. After it, their gap in normalised entropy (NE) is the loss from
staleness: what the model loses by not learning the newest labels.

NE over event time is computed in buckets of impression time. Each bucket's
NE is its mean log loss over the entropy of its own click rate, so a change
of click rate alone does not move the line. Bucket edges are aligned to the
freeze time, so no bucket mixes examples from before and after it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.metrics.binary import BinaryReport, binary_entropy, log_losses, roc_auc
from shared.metrics.bootstrap import (
    DifferenceInterval,
    paired_bootstrap,
    weighted_normalized_entropy,
)
from shared.replay.arms import ReplayArm
from shared.replay.report import (
    _cell,
    _cut_y_axis_above_bulk,
    _escape,
    _new_figure,
    _save,
    _show_message,
    _table,
)
from shared.replay.runner import ReplayResult
from shared.replay.summary import (
    NOT_AVAILABLE,
    format_count,
    format_duration,
    format_event_time,
    format_metric,
)

NAME = "freshness"
PLOT_FILE = "freshness.png"

# NE over time is measured in buckets of a quarter of the retrain period. When
# that gives fewer than MIN_BUCKETS or more than MAX_BUCKETS over the served
# examples' span, the span is cut into that many buckets instead.
BUCKETS_PER_PERIOD = 4
MIN_BUCKETS = 12
MAX_BUCKETS = 200
# The report lists this many retrains; metrics.json lists all of them.
MAX_RETRAINS_LISTED = 60

_COLORS = ("tab:blue", "tab:red", "tab:green")


@dataclass(frozen=True)
class Schedules:
    """The three arms of the freshness experiment and the time the copies stop learning."""

    continuous: ReplayArm
    frozen: ReplayArm
    retrained: ReplayArm
    freeze_at: float

    @property
    def arms(self) -> tuple[ReplayArm, ReplayArm, ReplayArm]:
        """The arms in a fixed order: continuous, frozen, retrained."""
        return self.continuous, self.frozen, self.retrained

    def label(self, arm: ReplayArm) -> str:
        """Name an arm by its schedule, e.g. ``ctr (continuous)``."""
        if arm is not self.continuous:
            return arm.name
        if arm.spec.learn_until is not None:
            return f"{arm.name} (stops learning at the holdout)"
        return f"{arm.name} (continuous)"


def find_schedules(result: ReplayResult) -> Schedules | None:
    """Return the freshness arms of a replay, or None when it ran without freshness."""
    frozen = next((arm for arm in result.arms if arm.spec.schedule == "frozen"), None)
    retrained = next((arm for arm in result.arms if arm.spec.schedule == "retrain"), None)
    if frozen is None or retrained is None or frozen.spec.learn_until is None:
        return None
    return Schedules(result.arms[0], frozen, retrained, frozen.spec.learn_until)


def served_arrays(result: ReplayResult, arm: ReplayArm) -> tuple[np.ndarray, np.ndarray]:
    """Return an arm's served scores and labels, in the order of ``result.evaluated_times``."""
    scores, labels = arm.learner.evaluation.served["model"].scores_and_labels()
    if len(scores) != len(result.evaluated_times):
        raise ValueError(
            f"arm {arm.name!r} has {len(scores):,} served scores but the replay recorded "
            f"{len(result.evaluated_times):,} evaluated times; its metrics must keep scores"
        )
    return scores, labels


def binary_report(scores: np.ndarray, labels: np.ndarray) -> BinaryReport:
    """Compute the metrics of a set of served scores, as :class:`BinaryMetrics` reports them."""
    count = len(scores)
    if count == 0:
        return BinaryReport(0, 0, None, None, None, None, None)
    positives = int(labels.sum())
    log_loss = float(log_losses(scores, labels).mean())
    entropy = binary_entropy(positives / count)
    prediction_sum = float(scores.sum())
    return BinaryReport(
        count=count,
        positives=positives,
        log_loss=log_loss,
        normalized_entropy=log_loss / entropy if entropy > 0 else None,
        auc=roc_auc(scores, labels),
        calibration=prediction_sum / positives if positives else None,
        mean_prediction=prediction_sum / count,
    )


def report_between(
    result: ReplayResult, arm: ReplayArm, start: float | None = None, end: float | None = None
) -> BinaryReport:
    """Compute an arm's served-score metrics for impressions in ``[start, end)`` of event time."""
    scores, labels = served_arrays(result, arm)
    times = np.frombuffer(result.evaluated_times, dtype=np.float64)
    mask = np.ones(len(times), dtype=bool)
    if start is not None:
        mask &= times >= start
    if end is not None:
        mask &= times < end
    return binary_report(scores[mask], labels[mask])


# NE over event time.


@dataclass(frozen=True)
class Bucket:
    """Served examples whose impression time is in ``[start, end)``, with each arm's NE."""

    start: float
    end: float
    count: int
    positives: int
    # One value per arm in Schedules.arms order; None without both clicks and non-clicks.
    normalized_entropy: tuple[float | None, ...]


def bucket_seconds(retrain_every: float, first: float, last: float) -> float:
    """Return the bucket width: a quarter period, unless that gives too few or too many buckets."""
    width = retrain_every / BUCKETS_PER_PERIOD
    span = last - first
    if span <= 0:
        return width
    if span / width < MIN_BUCKETS:
        return span / MIN_BUCKETS
    if span / width > MAX_BUCKETS:
        return span / MAX_BUCKETS
    return width


def time_buckets(result: ReplayResult, schedules: Schedules) -> tuple[float, list[Bucket]]:
    """Cut the served examples into buckets of impression time; return the width and the buckets.

    Buckets without a served example are left out.
    """
    times = np.frombuffer(result.evaluated_times, dtype=np.float64)
    period = result.config.retrain_every_seconds
    if times.size == 0:
        return period / BUCKETS_PER_PERIOD, []
    width = bucket_seconds(period, float(times.min()), float(times.max()))

    # Edges at freeze_at + k * width, with k counted from the first bucket.
    offsets = np.floor((times - schedules.freeze_at) / width).astype(np.int64)
    first_offset = int(offsets.min())
    index = offsets - first_offset
    bucket_count = int(index.max()) + 1
    counts = np.bincount(index, minlength=bucket_count)

    _, labels = served_arrays(result, schedules.continuous)
    positives = np.bincount(index, weights=labels, minlength=bucket_count)
    loss_sums = []
    for arm in schedules.arms:
        scores, labels = served_arrays(result, arm)
        loss_sums.append(
            np.bincount(index, weights=log_losses(scores, labels), minlength=bucket_count)
        )

    buckets = []
    for position in np.flatnonzero(counts):
        count, clicks = int(counts[position]), int(positives[position])
        entropy = binary_entropy(clicks / count)
        start = schedules.freeze_at + (first_offset + int(position)) * width
        buckets.append(
            Bucket(
                start=start,
                end=start + width,
                count=count,
                positives=clicks,
                normalized_entropy=tuple(
                    float(sums[position]) / count / entropy if entropy > 0 else None
                    for sums in loss_sums
                ),
            )
        )
    return width, buckets


def _datetime(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def plot_normalized_entropy(result: ReplayResult, schedules: Schedules, path: Path) -> None:
    """Plot each schedule's NE per time bucket, with the freeze and every retrain marked."""
    width, buckets = time_buckets(result, schedules)
    figure, axes = _new_figure()
    title = f"Normalised entropy per {format_duration(width)} of impression time"
    axes.set_title(title)
    axes.set_xlabel("impression time (UTC)")
    axes.set_ylabel("normalised entropy (log loss / entropy of click rate)")

    # numpy reads None as NaN, which leaves a gap in the line.
    series = [
        np.array([bucket.normalized_entropy[index] for bucket in buckets], dtype=float)
        for index in range(len(schedules.arms))
    ]
    if not buckets or all(np.isnan(values).all() for values in series):
        _show_message(axes, "No normalised entropy: no time bucket had both clicks and non-clicks.")
        _save(figure, path)
        return

    middles = [_datetime((bucket.start + bucket.end) / 2) for bucket in buckets]
    marker = "o" if len(buckets) < 30 else None
    for arm, values, color in zip(schedules.arms, series, _COLORS, strict=True):
        # Before the freeze the lines coincide; continuous is drawn on top.
        on_top = arm is schedules.continuous
        axes.plot(
            middles,
            values,
            color=color,
            marker=marker,
            label=schedules.label(arm),
            zorder=3 if on_top else 2,
        )
    axes.axhline(
        1.0,
        color="black",
        linestyle=":",
        linewidth=1,
        label="1.0 = predicting the bucket's click rate",
    )
    axes.axvline(
        _datetime(schedules.freeze_at),
        color="black",
        linestyle="--",
        linewidth=1.2,
        label="freeze: the copies stop learning online",
    )
    retrains = schedules.retrained.retrains
    for number, retrain in enumerate(retrains):
        axes.axvline(
            _datetime(retrain.event_time),
            color="tab:green",
            linestyle=":",
            linewidth=1,
            label=f"retrain from scratch ({len(retrains):,})" if number == 0 else None,
        )
    _cut_y_axis_above_bulk(axes, series, title, minimum_top=1.2)
    axes.legend(loc="best")
    _save(figure, path)


# The loss from staleness.


@dataclass(frozen=True)
class StalenessRow:
    """One schedule's served-score metrics before and after the freeze."""

    arm: ReplayArm
    label: str
    before: BinaryReport
    after: BinaryReport
    # NE after the freeze over the continuous arm's, minus 1; None when undefined.
    relative_to_continuous: float | None
    # NE after the freeze minus the continuous arm's, with its paired bootstrap
    # interval; None for the continuous arm itself and without examples after it.
    interval: DifferenceInterval | None = None

    @property
    def significantly_worse(self) -> bool:
        """Whether the copy's NE after the freeze is above continuous learning's beyond noise."""
        return (
            self.interval is not None
            and self.interval.significant
            and (self.interval.estimate or 0.0) > 0
        )


def staleness_rows(result: ReplayResult, schedules: Schedules) -> list[StalenessRow]:
    """Measure every schedule before and after the freeze, and against continuous learning.

    Computed once per result, because the bootstrap intervals take seconds.
    """
    return result.cached(NAME, lambda _: _staleness_rows(result, schedules))


def _staleness_rows(result: ReplayResult, schedules: Schedules) -> list[StalenessRow]:
    reports = [
        (
            arm,
            report_between(result, arm, end=schedules.freeze_at),
            report_between(result, arm, start=schedules.freeze_at),
        )
        for arm in schedules.arms
    ]
    continuous_ne = reports[0][2].normalized_entropy
    times = np.frombuffer(result.evaluated_times, dtype=np.float64)
    after_freeze = times >= schedules.freeze_at
    continuous_scores, labels = served_arrays(result, schedules.continuous)
    config = result.config

    rows = []
    for arm, before, after in reports:
        relative = interval = None
        if after.normalized_entropy is not None and continuous_ne:
            relative = after.normalized_entropy / continuous_ne - 1.0
        if arm is not schedules.continuous and after_freeze.any():
            scores, _ = served_arrays(result, arm)
            interval = paired_bootstrap(
                weighted_normalized_entropy,
                continuous_scores[after_freeze],
                scores[after_freeze],
                labels[after_freeze],
                confidence_level=config.confidence_level,
                samples=config.bootstrap_samples,
                seed=config.bootstrap_seed,
            )
        rows.append(StalenessRow(arm, schedules.label(arm), before, after, relative, interval))
    return rows


def _interval_text(interval: DifferenceInterval | None) -> str:
    if interval is None or interval.low is None or interval.high is None:
        return NOT_AVAILABLE
    return f"[{interval.low:+.4f}, {interval.high:+.4f}]"


def _percent(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value * 100:+.2f} %"


def _retrain_sizes(schedules: Schedules) -> str:
    retrains = schedules.retrained.retrains
    every = format_duration(schedules.retrained.spec.retrain_every)
    if not retrains:
        return f"no retrain from scratch: no impression came a full {every} after the freeze"
    sizes = [retrain.examples for retrain in retrains]
    return (
        f"{len(retrains):,} retrains from scratch, one per {every}, on "
        f"{format_count(min(sizes))} to {format_count(max(sizes))} examples"
    )


# The experiment's interface.


def summary_lines(result: ReplayResult) -> list[str]:
    """Return the console lines: NE of each schedule before and after the freeze."""
    schedules = find_schedules(result)
    if schedules is None:
        return []
    rows = staleness_rows(result, schedules)

    label_width = max(len(row.label) for row in rows) + 4
    level = f"{result.config.confidence_level * 100:g} %"
    columns = ("NE before", "NE after", "vs continuous", f"{level} interval")
    widths = (12, 12, 15, 22)
    lines = [
        f"Freshness: copies of {schedules.continuous.name} stop learning online at "
        f"{format_event_time(schedules.freeze_at)}",
        "".ljust(label_width)
        + "".join(column.rjust(width) for column, width in zip(columns, widths, strict=True)),
    ]
    for row in rows:
        cells = (
            format_metric("normalized_entropy", row.before.normalized_entropy),
            format_metric("normalized_entropy", row.after.normalized_entropy),
            "" if row.arm is schedules.continuous else _percent(row.relative_to_continuous),
            "" if row.arm is schedules.continuous else _interval_text(row.interval),
        )
        line = ("  " + row.label).ljust(label_width) + "".join(
            cell.rjust(width) for cell, width in zip(cells, widths, strict=True)
        )
        lines.append(line.rstrip())

    after = rows[0].after
    lines.append(
        f"  after the freeze: {format_count(after.count)} served examples, "
        f"{format_count(after.positives)} clicks; above 0 the copy is worse"
    )
    lines.append("  the interval is a paired bootstrap of the NE difference against continuous")
    lines.append(f"  {_retrain_sizes(schedules)}")
    return lines


def _staleness_table(rows: list[StalenessRow], schedules: Schedules) -> str:
    headers = [
        "schedule",
        "NE before freeze",
        "NE after freeze",
        "NE after vs continuous",
        "NE difference after, interval",
        "log loss after",
        "AUC after",
        "calibration after",
    ]
    body = []
    for row in rows:
        relative = "" if row.arm is schedules.continuous else _percent(row.relative_to_continuous)
        worse = row.significantly_worse
        cells = [
            _cell(row.label, number=False),
            _cell(format_metric("normalized_entropy", row.before.normalized_entropy)),
            _cell(format_metric("normalized_entropy", row.after.normalized_entropy)),
            _cell(relative),
            _cell("" if row.arm is schedules.continuous else _interval_text(row.interval)),
            _cell(format_metric("log_loss", row.after.log_loss)),
            _cell(format_metric("auc", row.after.auc)),
            _cell(format_metric("calibration", row.after.calibration)),
        ]
        row_class = ' class="worse"' if worse else ""
        body.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    return _table(headers, body)


def _retrains_table(schedules: Schedules) -> str:
    retrains = schedules.retrained.retrains
    if not retrains:
        return f'<p class="note">{_escape(_retrain_sizes(schedules))}.</p>'
    rows = [
        f"<tr>{_cell(f'{number:,}')}{_cell(format_event_time(retrain.event_time), number=False)}"
        f"{_cell(format_count(retrain.examples))}</tr>"
        for number, retrain in enumerate(retrains[:MAX_RETRAINS_LISTED], start=1)
    ]
    listed = ""
    if len(retrains) > MAX_RETRAINS_LISTED:
        listed = f" The first {MAX_RETRAINS_LISTED} are listed; metrics.json has all of them."
    return (
        _table(["retrain", "due at (event time)", "examples learned"], rows)
        + f'<p class="note">{_escape(_retrain_sizes(schedules))}. Each rebuild is a new model '
        "trained in one pass on every label the join had released by its due time, and it "
        f"serves until the next one.{_escape(listed)}</p>"
    )


def html_section(result: ReplayResult, directory: Path) -> str:
    """Write the freshness plot and return the section with its tables; "" without freshness."""
    schedules = find_schedules(result)
    if schedules is None:
        return ""
    plot_normalized_entropy(result, schedules, Path(directory) / PLOT_FILE)
    rows = staleness_rows(result, schedules)
    every = format_duration(schedules.retrained.spec.retrain_every)
    freeze = format_event_time(schedules.freeze_at)
    caption = (
        f"Normalised entropy of served scores per bucket of impression time. The dashed line "
        f"at {freeze} is the freeze: before it the three lines are one model. After it the gap "
        "between the continuous line and the others is what learning in real time gains, "
        f"and each dotted green line is a retrain from scratch, one per {every}. Lower is better."
    )
    return (
        "<h2>Freshness</h2>"
        f'<p class="note">Three schedules of {_escape(schedules.continuous.name)} on the same '
        f"examples: learning online all the time, frozen at {_escape(freeze)}, and frozen then "
        f"rebuilt from scratch every {_escape(every)}.</p>"
        f'<figure><img src="{PLOT_FILE}" alt="{PLOT_FILE}">'
        f"<figcaption>{_escape(caption)}</figcaption></figure>"
        + _staleness_table(rows, schedules)
        + '<p class="note">Served-score metrics before and after the freeze, on the same '
        "examples for every schedule. The loss from staleness is the NE change against "
        "continuous learning after the freeze: a positive percentage means the copy predicts "
        "worse than the model that kept learning. The interval is a paired bootstrap of the "
        "NE difference over the examples after the freeze; a red row is worse beyond that "
        "noise. Before the freeze all three match, because they are the same model.</p>"
        + "<h3>Retrains from scratch</h3>"
        + _retrains_table(schedules)
    )


def document(result: ReplayResult) -> dict[str, Any] | None:
    """Return the freshness numbers for metrics.json, or None without freshness."""
    schedules = find_schedules(result)
    if schedules is None:
        return None
    width, buckets = time_buckets(result, schedules)
    names = [arm.name for arm in schedules.arms]
    return {
        "freeze_at": format_event_time(schedules.freeze_at),
        "freeze_at_seconds": schedules.freeze_at,
        "retrain_every_seconds": schedules.retrained.spec.retrain_every,
        "schedules": [
            {
                "arm": row.arm.name,
                "schedule": row.arm.spec.schedule,
                "before_freeze": row.before.as_dict(),
                "after_freeze": row.after.as_dict(),
                "normalized_entropy_after_vs_continuous": row.relative_to_continuous,
                "normalized_entropy_difference_after": (
                    None if row.interval is None else row.interval.as_dict()
                ),
            }
            for row in staleness_rows(result, schedules)
        ],
        "retrains": [
            {
                "event_time": format_event_time(retrain.event_time),
                "event_time_seconds": retrain.event_time,
                "examples": retrain.examples,
            }
            for retrain in schedules.retrained.retrains
        ],
        "bucket_seconds": width,
        "buckets": [
            {
                "start_seconds": bucket.start,
                "end_seconds": bucket.end,
                "count": bucket.count,
                "positives": bucket.positives,
                "normalized_entropy": dict(zip(names, bucket.normalized_entropy, strict=True)),
            }
            for bucket in buckets
        ],
    }
