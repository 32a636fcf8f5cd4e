"""Offline A/B: is a challenger really better than the main model on the same examples?

Every continuous arm, the main model first and then each ``compare`` model,
scored the same impressions and saw the same labels in the same order, so
their served scores pair up example by example. For each other arm and each
metric, the section reports the difference to the main model with a paired
bootstrap interval at ``confidence_level``: one resample of examples per
replicate, applied to both arms. A difference is significant when its
interval excludes 0.

The frozen and retrained copies of the freshness experiment are not compared
here, because they answer a different question, and the freshness section
reports them.

NOTE: the bootstrap resamples examples independently. Losses that are
correlated in time (drift, bursts of one user) make the intervals narrower
than they should be, so treat a difference near the edge with care.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.metrics.bootstrap import (
    COMPARED_METRICS,
    DifferenceInterval,
    MetricDefinition,
    compare_paired,
    weighted_calibration,
)
from shared.replay.arms import ReplayArm
from shared.replay.report import _FIGURE_DPI, _cell, _escape, _save, _table
from shared.replay.runner import ReplayResult
from shared.replay.summary import METRIC_DECIMALS, NOT_AVAILABLE, SUMMARY_WIDTH, format_count

NAME = "comparison"
COMPARISON_PLOT = "comparison.png"

# Decimal places of each compared metric, differences included.
_DECIMALS = {**METRIC_DECIMALS, "calibration_error": METRIC_DECIMALS["calibration"]}
_COLORS = {"better": "tab:green", "worse": "tab:red", "same": "tab:gray"}


@dataclass(frozen=True, slots=True)
class MetricComparison:
    """One metric of one compared arm against the main model."""

    metric: MetricDefinition
    reference_value: float | None
    arm_value: float | None
    difference: DifferenceInterval

    @property
    def arm_better(self) -> bool | None:
        """True if the arm is significantly better, False if significantly worse, else None."""
        interval = self.difference
        if not interval.significant:
            return None
        assert interval.low is not None and interval.high is not None
        higher = interval.low > 0.0
        return higher if self.metric.higher_is_better else not higher


@dataclass(frozen=True)
class Comparison:
    """The main model against every other continuous arm, on the same served examples."""

    reference: str
    arms: list[str]
    examples: int
    positives: int
    # Every arm's metrics of the full sample, keyed by arm and metric name.
    # "calibration" is predicted over observed clicks.
    values: dict[str, dict[str, float | None]]
    # Per compared arm (every arm but the first), one entry per metric.
    rows: dict[str, list[MetricComparison]]
    # Arms left out because they do not learn continuously, as (name, schedule).
    not_compared: list[tuple[str, str]]
    confidence_level: float
    samples: int
    seed: int


def compare(result: ReplayResult) -> Comparison | None:
    """Compare every continuous arm with the first one, or return None if there is only one.

    Raises ValueError naming the arms when their served labels differ, which
    would make a paired comparison meaningless.
    """
    # The summary, the report and metrics.json each ask, and the bootstrap is slow.
    return result.cached(NAME, _compare)


def _continuous(arm: ReplayArm) -> bool:
    return arm.spec.schedule == "continuous"


def _compare(result: ReplayResult) -> Comparison | None:
    arms = [arm for arm in result.arms if _continuous(arm)]
    if len(arms) < 2:
        return None
    config = result.config
    scores, labels = _paired_scores(arms)

    values: dict[str, dict[str, float | None]] = {arm.name: {} for arm in arms}
    differences: dict[str, dict[str, DifferenceInterval]] = {}
    if labels.size:
        values, differences = compare_paired(
            scores,
            labels,
            COMPARED_METRICS,
            confidence_level=config.confidence_level,
            samples=config.bootstrap_samples,
            seed=config.bootstrap_seed,
        )
        for name, arm_scores in scores.items():
            calibration = float(
                weighted_calibration(np.ones((1, labels.size)), arm_scores, labels)[0]
            )
            values[name]["calibration"] = calibration if np.isfinite(calibration) else None

    reference = arms[0].name
    rows = {
        arm.name: [
            MetricComparison(
                metric=metric,
                reference_value=values[reference].get(metric.name),
                arm_value=values[arm.name].get(metric.name),
                difference=differences[arm.name][metric.name],
            )
            for metric in COMPARED_METRICS
        ]
        for arm in arms[1:]
        if arm.name in differences
    }
    return Comparison(
        reference=reference,
        arms=[arm.name for arm in arms],
        examples=int(labels.size),
        positives=int(labels.sum()),
        values=values,
        rows=rows,
        not_compared=[(arm.name, arm.spec.schedule) for arm in result.arms if not _continuous(arm)],
        confidence_level=config.confidence_level,
        samples=config.bootstrap_samples,
        seed=config.bootstrap_seed,
    )


def _paired_scores(arms: list[ReplayArm]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Return each arm's served scores and the labels they share, or raise if the labels differ."""
    reference = arms[0]
    reference_scores, labels = reference.learner.evaluation.served["model"].scores_and_labels()
    scores = {reference.name: reference_scores}
    for arm in arms[1:]:
        arm_scores, arm_labels = arm.learner.evaluation.served["model"].scores_and_labels()
        if not np.array_equal(arm_labels, labels):
            raise ValueError(
                f"served labels of arm {arm.name!r} ({arm_labels.size:,} examples) differ from "
                f"those of arm {reference.name!r} ({labels.size:,} examples), so the two cannot "
                "be compared example by example. Every arm must see the same examples in the "
                "same order, so this is a bug in the replay's arms"
            )
        scores[arm.name] = arm_scores
    return scores, labels


# Wording shared by the summary, the report and metrics.json.


def _outcome(row: MetricComparison, reference: str, arm: str) -> str:
    if row.difference.low is None:
        return "not measurable"
    better = row.arm_better
    if better is None:
        return "not significant"
    return f"{arm} better" if better else f"{reference} better"


def _format_value(metric: str, value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.{_DECIMALS[metric]}f}"


def _format_difference(metric: str, value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:+.{_DECIMALS[metric]}f}"


def _format_interval(metric: str, interval: DifferenceInterval) -> str:
    if interval.low is None or interval.high is None:
        return NOT_AVAILABLE
    return (
        f"[{_format_difference(metric, interval.low)}, {_format_difference(metric, interval.high)}]"
    )


def _level(comparison: Comparison) -> str:
    return f"{comparison.confidence_level * 100:g} %"


def _not_compared_text(comparison: Comparison) -> str | None:
    if not comparison.not_compared:
        return None
    arms = ", ".join(f"{name} ({schedule})" for name, schedule in comparison.not_compared)
    return f"Not compared here, because they do not learn continuously (see freshness): {arms}"


# Console summary.


def summary_lines(result: ReplayResult) -> list[str]:
    """Return the offline A/B tables for the console, or [] when no model was compared."""
    comparison = compare(result)
    if comparison is None:
        return []
    lines = [
        f"Offline A/B against {comparison.reference}: paired bootstrap, "
        f"{comparison.samples:,} resamples, {_level(comparison)} intervals, "
        f"{format_count(comparison.examples)} examples",
    ]
    if not comparison.examples:
        lines.append("  no served examples, so nothing to compare")
    else:
        lines += _value_lines(comparison)
        lines += _difference_lines(comparison)
    not_compared = _not_compared_text(comparison)
    if not_compared is not None:
        lines += textwrap.wrap(
            not_compared, SUMMARY_WIDTH, initial_indent="  ", subsequent_indent="    "
        )
    return lines


def _value_lines(comparison: Comparison) -> list[str]:
    width = max(12, *(len(arm) + 2 for arm in comparison.arms))
    lines = ["  " + "metric".ljust(22) + "".join(arm.rjust(width) for arm in comparison.arms)]
    for metric in COMPARED_METRICS:
        cells = "".join(
            _format_value(metric.name, comparison.values[arm].get(metric.name)).rjust(width)
            for arm in comparison.arms
        )
        lines.append("  " + metric.label.ljust(22) + cells)
    return lines


def _difference_lines(comparison: Comparison) -> list[str]:
    reference = comparison.reference
    arm_width = max(8, *(len(arm) + 2 for arm in comparison.rows))
    lines = [
        "  "
        + f"arm - {reference}".ljust(arm_width + 20)
        + "difference".rjust(11)
        + "  "
        + f"{_level(comparison)} interval".ljust(24)
        + "result"
    ]
    for arm, rows in comparison.rows.items():
        for row in rows:
            name = row.metric.name
            lines.append(
                "  "
                + arm.ljust(arm_width)
                + row.metric.label.ljust(20)
                + _format_difference(name, row.difference.estimate).rjust(11)
                + "  "
                + _format_interval(name, row.difference).ljust(24)
                + _outcome(row, reference, arm)
            )
    lines.append(
        "  Lower is better except for AUC. A difference is significant when its interval "
        "excludes 0."
    )
    return lines


# HTML report.


def html_section(result: ReplayResult, directory: Path) -> str:
    """Return the offline A/B section with its table and plot, or "" when nothing was compared."""
    comparison = compare(result)
    if comparison is None:
        return ""
    parts = ["<h2>Offline A/B</h2>"]
    if not comparison.examples:
        parts.append('<p class="note">No served examples, so nothing to compare.</p>')
    else:
        parts.append(_html_table(comparison))
        _plot(comparison, Path(directory) / COMPARISON_PLOT)
        parts.append(_figure(comparison))
    not_compared = _not_compared_text(comparison)
    if not_compared is not None:
        parts.append(f'<p class="note">{_escape(not_compared)}.</p>')
    return "".join(parts)


def _html_table(comparison: Comparison) -> str:
    reference = comparison.reference
    level = _level(comparison)
    headers = [
        "arm",
        "metric",
        f"{reference} (main)",
        "arm's value",
        f"difference (arm − {reference})",
        f"{level} interval",
        "result",
    ]
    rows = []
    for arm, arm_rows in comparison.rows.items():
        for row in arm_rows:
            name = row.metric.name
            better = row.arm_better
            row_class = ' class="worse"' if better is False else ""
            cells = [
                _cell(arm, number=False),
                _cell(row.metric.label, number=False),
                _cell(_format_value(name, row.reference_value)),
                _cell(_format_value(name, row.arm_value)),
                _cell(_format_difference(name, row.difference.estimate)),
                _cell(_format_interval(name, row.difference)),
                _cell(_outcome(row, reference, arm), number=False),
            ]
            rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    caption = (
        f"Each row compares one arm with {reference} on the same "
        f"{comparison.examples:,} served examples ({comparison.positives:,} clicks). The "
        f"difference is the arm's value minus {reference}'s, and the interval is a paired "
        f"bootstrap {level} percentile interval from {comparison.samples:,} resamples of the "
        f"examples, seed {comparison.seed}, each applied to both arms. AUC uses the same "
        "resamples and is computed exactly on each. A result is significant when its interval "
        "excludes 0. Lower is better for log loss, normalised entropy and |calibration − 1| "
        "(0 means predicted clicks equal observed ones), higher is better for AUC. Rows in red "
        f"are metrics on which the arm is significantly worse than {reference}. Each interval "
        "holds at its level on its own, so with many rows one may exclude 0 by chance, and "
        "the resampling treats examples as independent, which makes intervals too narrow when "
        "losses are correlated in time."
    )
    return _table(headers, rows) + f'<p class="note">{_escape(caption)}</p>'


def _figure(comparison: Comparison) -> str:
    caption = (
        f"Each point is an arm's difference to {comparison.reference} on one metric, with its "
        f"{_level(comparison)} paired bootstrap interval, and the dashed line is no difference. "
        "Green means the arm is significantly better, red significantly worse, gray that the "
        "interval contains 0. Each panel has its own scale."
    )
    return (
        f'<figure><img src="{COMPARISON_PLOT}" alt="differences to {_escape(comparison.reference)}'
        f' with bootstrap intervals"><figcaption>{_escape(caption)}</figcaption></figure>'
    )


def _plot(comparison: Comparison, path: Path) -> None:
    arms = list(comparison.rows)
    metrics = COMPARED_METRICS
    height = 1.0 + len(metrics) * (0.9 + 0.35 * len(arms))
    figure = Figure(figsize=(9.0, height), dpi=_FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    panels = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]

    for index, (axes, metric) in enumerate(zip(panels, metrics, strict=True)):
        direction = "higher" if metric.higher_is_better else "lower"
        axes.set_title(
            f"{metric.label}: arm − {comparison.reference} ({direction} is better for the arm)",
            fontsize=10,
        )
        axes.axvline(0.0, color="black", linestyle="--", linewidth=1)
        axes.grid(True, axis="x", alpha=0.3)
        for position, arm in enumerate(arms):
            row = comparison.rows[arm][index]
            _plot_row(axes, position, row)
        axes.set_yticks(range(len(arms)), arms)
        axes.set_ylim(-0.6, len(arms) - 0.4)
        axes.invert_yaxis()
    _save(figure, path)


def _plot_row(axes: Any, position: int, row: MetricComparison) -> None:
    interval = row.difference
    if interval.estimate is None:
        axes.text(0.0, position, " not measurable", va="center", fontsize=9)
        return
    better = row.arm_better
    if better is None:
        color = _COLORS["same"]
    else:
        color = _COLORS["better"] if better else _COLORS["worse"]
    if interval.low is not None and interval.high is not None:
        error = [[interval.estimate - interval.low], [interval.high - interval.estimate]]
        axes.errorbar(interval.estimate, position, xerr=error, color=color, marker="o", capsize=4)
    else:
        axes.plot(interval.estimate, position, color=color, marker="o")


# metrics.json.


def document(result: ReplayResult) -> dict[str, Any] | None:
    """Return the comparison's numbers for metrics.json, or None when no model was compared."""
    comparison = compare(result)
    if comparison is None:
        return None
    return {
        "reference": comparison.reference,
        "arms": comparison.arms,
        "examples": comparison.examples,
        "positives": comparison.positives,
        "confidence_level": comparison.confidence_level,
        "bootstrap_samples": comparison.samples,
        "bootstrap_seed": comparison.seed,
        "values": comparison.values,
        "differences": {
            arm: {
                row.metric.name: {
                    **row.difference.as_dict(),
                    "result": _outcome(row, comparison.reference, arm),
                }
                for row in rows
            }
            for arm, rows in comparison.rows.items()
        },
        "not_compared": [
            {"arm": name, "schedule": schedule} for name, schedule in comparison.not_compared
        ],
    }
