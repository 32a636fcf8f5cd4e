"""Slices: does the model hold up for every segment, or only on average?

For each value of each ``segment_by`` feature, the main model's served
scores are compared with the baseline's on the same examples. A row is
flagged when the model's normalised entropy is above the baseline's, or when
its calibration is off 1.0 by more than ``calibration_tolerance``. Values
with fewer than ``slice_min_count`` served examples are too noisy to judge
one by one, so they are pooled into one row whose metrics are those of all
their examples together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.learn.models import BASELINE_MODEL
from shared.metrics.binary import BinaryMetrics, BinaryReport, pool_binary_metrics
from shared.replay.report import _cell, _escape, _table
from shared.replay.runner import ReplayResult
from shared.replay.summary import format_count, format_metric, format_rate

NAME = "slices"

WORSE_THAN_BASELINE = "worse_than_baseline"
MISCALIBRATED = "miscalibrated"
# The console lists at most this many flagged rows per feature; the report lists all.
MAX_SUMMARY_FLAGS = 10
# The report names at most this many of the values pooled into the small-segments row.
MAX_POOLED_VALUES_NAMED = 30
_SUMMARY_LABEL_WIDTH = 22


@dataclass(frozen=True, slots=True)
class SliceRow:
    """One row of a slices table: a segment value, or the pooled small segments."""

    label: str
    # The segment values the row covers: one, or every pooled small segment.
    values: tuple[str, ...]
    model: BinaryReport
    baseline: BinaryReport
    flags: tuple[str, ...]
    pooled: bool = False


def is_worse_than_baseline(model: BinaryReport, baseline: BinaryReport) -> bool:
    """Return whether the model's normalised entropy is above the baseline's, False if undefined."""
    if model.normalized_entropy is None or baseline.normalized_entropy is None:
        return False
    return model.normalized_entropy > baseline.normalized_entropy


def is_miscalibrated(model: BinaryReport, tolerance: float) -> bool:
    """Return whether ``|calibration - 1|`` exceeds the tolerance, False without a click."""
    if model.calibration is None:
        return False
    return abs(model.calibration - 1.0) > tolerance


def row_flags(model: BinaryReport, baseline: BinaryReport, tolerance: float) -> tuple[str, ...]:
    """Return the flags of one row, in a fixed order."""
    flags = []
    if is_worse_than_baseline(model, baseline):
        flags.append(WORSE_THAN_BASELINE)
    if is_miscalibrated(model, tolerance):
        flags.append(MISCALIBRATED)
    return tuple(flags)


def pooled_label(min_count: int) -> str:
    """Return the label of the row that pools the small segments."""
    return f"(fewer than {min_count:,} each)"


def slice_rows(
    by_value: dict[str, dict[str, BinaryMetrics]], min_count: int, tolerance: float
) -> list[SliceRow]:
    """Build one feature's rows: large segments by count, then the pooled small ones.

    ``by_value`` maps each segment value to its ``model`` and ``baseline``
    metrics, as :class:`ProgressiveEvaluation` keeps them.
    """
    large = {value: arms for value, arms in by_value.items() if arms["model"].count >= min_count}
    small = {value: arms for value, arms in by_value.items() if arms["model"].count < min_count}

    # Largest segments first, and the value breaks ties so the order is stable.
    ordered = sorted(large.items(), key=lambda item: (-item[1]["model"].count, item[0]))
    rows = []
    for value, arms in ordered:
        model, baseline = arms["model"].report(), arms["baseline"].report()
        flags = row_flags(model, baseline, tolerance)
        rows.append(SliceRow(value, (value,), model, baseline, flags))

    if small:
        values = tuple(sorted(small))
        model = pool_binary_metrics(small[value]["model"] for value in values).report()
        baseline = pool_binary_metrics(small[value]["baseline"] for value in values).report()
        flags = row_flags(model, baseline, tolerance)
        rows.append(SliceRow(pooled_label(min_count), values, model, baseline, flags, pooled=True))
    return rows


def feature_rows(result: ReplayResult) -> dict[str, list[SliceRow]]:
    """Build the rows of every segment feature of the main model."""
    config = result.config
    return {
        feature: slice_rows(by_value, config.slice_min_count, config.calibration_tolerance)
        for feature, by_value in result.evaluation.segments.items()
    }


def _flag_details(row: SliceRow) -> str:
    model, baseline = row.model, row.baseline
    details = []
    if WORSE_THAN_BASELINE in row.flags:
        details.append(
            f"NE {model.normalized_entropy:.4f} > baseline {baseline.normalized_entropy:.4f}"
        )
    if MISCALIBRATED in row.flags:
        details.append(f"calibration {model.calibration:.3f}")
    return "; ".join(details)


def _short(label: str) -> str:
    if len(label) <= _SUMMARY_LABEL_WIDTH - 1:
        return label
    return label[: _SUMMARY_LABEL_WIDTH - 4] + "..."


def summary_lines(result: ReplayResult) -> list[str]:
    """List the flagged rows of every segment feature, at most :data:`MAX_SUMMARY_FLAGS` each."""
    by_feature = feature_rows(result)
    if not by_feature:
        return []
    tolerance = result.config.calibration_tolerance
    lines = [
        f"Slices (flagged: NE above baseline {BASELINE_MODEL}, or |calibration - 1| > "
        f"{tolerance:g})"
    ]
    for feature, rows in by_feature.items():
        flagged = [row for row in rows if row.flags]
        lines.append(f"  {feature}: {len(flagged):,} of {len(rows):,} rows flagged")
        for row in flagged[:MAX_SUMMARY_FLAGS]:
            lines.append(
                f"    {_short(row.label).ljust(_SUMMARY_LABEL_WIDTH)}"
                f"{row.model.count:>10,} examples  {_flag_details(row)}"
            )
        if len(flagged) > MAX_SUMMARY_FLAGS:
            lines.append(f"    and {len(flagged) - MAX_SUMMARY_FLAGS:,} more in the report")
    return lines


def _html_row(row: SliceRow) -> str:
    model, baseline = row.model, row.baseline
    cells = [
        _cell(row.label, number=False),
        _cell(format_count(len(row.values))),
        _cell(format_count(model.count)),
        _cell(format_count(model.positives)),
        _cell(format_rate(model.click_rate)),
        _cell(format_metric("normalized_entropy", model.normalized_entropy)),
        _cell(format_metric("normalized_entropy", baseline.normalized_entropy)),
        _cell(format_metric("calibration", model.calibration)),
        _cell(format_metric("calibration", baseline.calibration)),
        _cell(format_metric("auc", model.auc)),
        _cell(", ".join(flag.replace("_", " ") for flag in row.flags), number=False),
    ]
    row_class = ' class="worse"' if row.flags else ""
    return f"<tr{row_class}>{''.join(cells)}</tr>"


def _pooled_note(row: SliceRow) -> str:
    named = ", ".join(row.values[:MAX_POOLED_VALUES_NAMED])
    more = len(row.values) - MAX_POOLED_VALUES_NAMED
    if more > 0:
        named += f" and {more:,} more"
    return (
        f'<p class="note">The row {_escape(row.label)} pools {len(row.values):,} values: '
        f"{_escape(named)}.</p>"
    )


def html_section(result: ReplayResult, directory: Path) -> str:
    """Render one slices table per segment feature, flagged rows in red."""
    by_feature = feature_rows(result)
    if not by_feature:
        return ""
    config = result.config
    model = config.model
    headers = [
        "value",
        "values",
        "examples",
        "clicks",
        "click rate",
        f"NE {model}",
        f"NE {BASELINE_MODEL}",
        f"calibration {model}",
        f"calibration {BASELINE_MODEL}",
        f"AUC {model}",
        "flags",
    ]
    parts = [
        "<h2>Slices</h2>",
        '<p class="note">Served-score metrics of each segment value, largest first. A row is red '
        f"when {_escape(model)} has a higher normalised entropy (NE) than the {BASELINE_MODEL} "
        "baseline on the same examples (worse than baseline), or when its calibration, "
        f"predicted over observed clicks, is off 1.0 by more than {config.calibration_tolerance:g} "
        "(miscalibrated). Calibration is undefined without clicks, so such rows are never "
        f"flagged as miscalibrated. Values with fewer than {config.slice_min_count:,} served "
        "examples share the last row, whose metrics are computed on all their examples "
        "together.</p>",
    ]
    for feature, rows in by_feature.items():
        parts.append(f"<h3>{_escape(feature)}</h3>")
        if not rows:
            parts.append('<p class="note">No served examples.</p>')
            continue
        parts.append(_table(headers, [_html_row(row) for row in rows]))
        parts.extend(_pooled_note(row) for row in rows if row.pooled)
    return "".join(parts)


def document(result: ReplayResult) -> dict[str, Any] | None:
    """Return every row and the list of flagged rows for metrics.json, or None without segments."""
    by_feature = feature_rows(result)
    if not by_feature:
        return None
    config = result.config
    return {
        "min_count": config.slice_min_count,
        "calibration_tolerance": config.calibration_tolerance,
        "features": {
            feature: [
                {
                    "value": row.label,
                    "values": list(row.values),
                    "model": row.model.as_dict(),
                    "baseline": row.baseline.as_dict(),
                    "flags": list(row.flags),
                }
                for row in rows
            ]
            for feature, rows in by_feature.items()
        },
        "flagged": [
            {"feature": feature, "value": row.label, "flags": list(row.flags)}
            for feature, rows in by_feature.items()
            for row in rows
            if row.flags
        ],
    }
