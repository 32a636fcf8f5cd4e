"""The plain-text summary printed at the end of a replay, and the figures it shares with the report.

The summary compares the model with the baseline on the scores that were
served, then on the scores taken just before each example was learned, whose
gap to the served ones is the cost of the label delay. Every line fits in
:data:`SUMMARY_WIDTH` columns.
"""

from __future__ import annotations

import datetime as dt
import textwrap
from collections.abc import Sequence
from typing import Any

import numpy as np

from shared.events import LabelSource
from shared.join import JoinOutcome
from shared.learn.models import BASELINE_MODEL
from shared.replay.experiments import sections
from shared.replay.runner import ReplayResult

SUMMARY_WIDTH = 100
NOT_AVAILABLE = "n/a"
# Quantiles of the positive label delay that the summary and the report show.
DELAY_QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))
# Decimal places per metric: enough to tell two close models apart.
METRIC_DECIMALS = {
    "log_loss": 5,
    "normalized_entropy": 4,
    "auc": 4,
    "calibration": 3,
    "mean_prediction": 5,
}

_LABEL_WIDTH = 24
_MIN_COLUMN_WIDTH = 12
_ARMS = ("model", "baseline")


# Number formatting.


def format_count(value: int | None) -> str:
    """Format a count with thousands separators."""
    return NOT_AVAILABLE if value is None else f"{value:,}"


def format_rate(value: float | None) -> str:
    """Format a share in [0, 1] as a percentage with three decimals, as click rates are small."""
    return NOT_AVAILABLE if value is None else f"{value * 100:.3f} %"


def format_metric(name: str, value: float | int | None) -> str:
    """Format one value of :meth:`BinaryReport.as_dict` by its metric name."""
    if value is None:
        return NOT_AVAILABLE
    if name in ("count", "positives"):
        return format_count(int(value))
    if name == "click_rate":
        return format_rate(value)
    return f"{value:.{METRIC_DECIMALS.get(name, 4)}f}"


def format_duration(seconds: float | None) -> str:
    """Format a duration in the largest unit that keeps it at least 1, such as ``8.6 min``."""
    if seconds is None:
        return NOT_AVAILABLE
    magnitude = abs(seconds)
    if magnitude < 60:
        return f"{seconds:.1f} s"
    if magnitude < 3600:
        return f"{seconds / 60:.1f} min"
    if magnitude < 86_400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86_400:.1f} d"


def format_event_time(seconds: float | None) -> str:
    """Format event-time seconds since the Unix epoch as ISO 8601 UTC with milliseconds."""
    if seconds is None:
        return NOT_AVAILABLE
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# Figures derived from a result, shared with the report.


def label_delay_quantiles(delays: Sequence[float]) -> dict[str, float | None]:
    """Return the p50, p90, p99 and max of positive label delays in seconds, None if empty."""
    if not delays:
        return {name: None for name, _ in DELAY_QUANTILES} | {"max": None}
    values = np.asarray(delays, dtype=float)
    quantiles = {name: float(np.quantile(values, q)) for name, q in DELAY_QUANTILES}
    return quantiles | {"max": float(values.max())}


def join_outcome_counts(result: ReplayResult) -> dict[str, int]:
    """Return the count of every join outcome, zeros included, in the enum's order."""
    return {outcome.value: result.join_counts.get(outcome, 0) for outcome in JoinOutcome}


def label_source_counts(result: ReplayResult) -> dict[str, int]:
    """Return the count of every label source but served notices, zeros included, in order."""
    counts = {
        source.value: result.label_counts.get(source.value, 0)
        for source in LabelSource
        if source != LabelSource.SERVED
    }
    for source in sorted(set(result.label_counts) - set(counts)):
        counts[source] = result.label_counts[source]
    return counts


def normalized_entropy_verdict(result: ReplayResult, report: dict[str, Any] | None = None) -> str:
    """Say whether the model beats the baseline on the normalised entropy of served scores.

    The margin is the relative reduction ``1 - NE(model) / NE(baseline)``, in percent.
    ``report`` is ``result.evaluation.report()`` when the caller already has it, because
    computing it ranks every kept score again.
    """
    if report is None:
        report = result.evaluation.report()
    served = report["served"]
    model_ne = served["model"]["normalized_entropy"]
    baseline_ne = served["baseline"]["normalized_entropy"]
    model = result.config.model
    if model_ne is None or baseline_ne is None:
        return (
            f"{model} vs baseline {BASELINE_MODEL}: no verdict, because normalised entropy "
            "needs both clicks and non-clicks among the served examples"
        )

    values = f"{model_ne:.4f} vs {baseline_ne:.4f}"
    margin = (1.0 - model_ne / baseline_ne) * 100.0
    if model_ne < baseline_ne:
        return (
            f"{model} beats baseline {BASELINE_MODEL} on normalised entropy "
            f"by {margin:.2f} % ({values})"
        )
    return (
        f"{model} does not beat baseline {BASELINE_MODEL} on normalised entropy "
        f"({values}, {-margin:.2f} % worse)"
    )


def holdout_facts(result: ReplayResult) -> tuple[str, str] | None:
    """Return two phrases that describe the time holdout, or None without one.

    The first gives the start and whether learning continues after it. The
    second counts the examples evaluated and learned, for example
    ``from 2019-11-28T00:00:00.000Z, learning after it: stops`` and
    ``12,345 examples evaluated, 6,789 learned before it``.
    """
    holdout_from = result.config.holdout_from
    if holdout_from is None:
        return None
    learning = "stops" if result.config.after_holdout == "freeze" else "continues"
    return (
        f"from {format_event_time(holdout_from.timestamp())}, learning after it: {learning}",
        f"{len(result.evaluated_times):,} examples evaluated, "
        f"{result.examples_before_holdout:,} learned before it",
    )


# The text summary.


def wrap_line(text: str) -> list[str]:
    """Wrap one long line to :data:`SUMMARY_WIDTH` columns, indenting the continuation lines."""
    return textwrap.wrap(text, SUMMARY_WIDTH, subsequent_indent="  ", break_on_hyphens=False)


def _shorten(text: str, width: int) -> str:
    """Cut a long text such as a path from the left, keeping its informative end."""
    if len(text) <= width:
        return text
    return "..." + text[-(width - 3) :]


def _table(
    title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]]
) -> list[str]:
    widths = [max(_MIN_COLUMN_WIDTH, len(column) + 2) for column in columns]
    header = title.ljust(_LABEL_WIDTH) + "".join(
        column.rjust(width) for column, width in zip(columns, widths, strict=True)
    )
    lines = [header]
    for label, cells in rows:
        line = ("  " + label).ljust(_LABEL_WIDTH) + "".join(
            cell.rjust(width) for cell, width in zip(cells, widths, strict=True)
        )
        lines.append(line)
    return lines


def _metric_rows(
    arms: dict[str, dict[str, float | int | None]], metrics: Sequence[tuple[str, str]]
) -> list[tuple[str, list[str]]]:
    return [
        (label, [format_metric(name, arms[arm][name]) for arm in _ARMS]) for name, label in metrics
    ]


def _header_lines(result: ReplayResult) -> list[str]:
    path_width = SUMMARY_WIDTH - len("Replay of ")
    invalid = len(result.invalid_lines)
    if result.wall_seconds > 0:
        rate = f"{result.events / result.wall_seconds:,.0f} events/s"
    else:
        rate = f"{NOT_AVAILABLE} events/s"
    span = None
    if result.first_event_time is not None and result.last_event_time is not None:
        span = result.last_event_time - result.first_event_time
    lines = [
        f"Replay of {_shorten(str(result.config.events), path_width)}",
        f"  events read       {result.events:,}: {result.impressions:,} impressions, "
        f"{result.clicks:,} clicks; {invalid:,} invalid lines skipped",
        f"  wall time         {format_duration(result.wall_seconds)} ({rate})",
        f"  event time        {format_event_time(result.first_event_time)} to "
        f"{format_event_time(result.last_event_time)} ({format_duration(span)})",
    ]
    holdout = holdout_facts(result)
    if holdout is not None:
        lines.append(f"  holdout           {holdout[0]}")
        lines.append(f"                    {holdout[1]}")
    return lines


def _served_lines(result: ReplayResult, report: dict[str, Any]) -> list[str]:
    columns = [result.config.model, BASELINE_MODEL]
    metrics = [
        ("count", "examples"),
        ("positives", "positives"),
        ("click_rate", "click rate"),
        ("log_loss", "log loss"),
        ("normalized_entropy", "normalised entropy"),
        ("auc", "AUC"),
        ("calibration", "calibration"),
    ]
    lines = _table("Served scores", columns, _metric_rows(report["served"], metrics))
    lines.append(
        "  (calibration is predicted over observed clicks: 1 is calibrated, above 1 over-predicts)"
    )
    if report["unserved_examples"]:
        lines.append(
            f"  {report['unserved_examples']:,} examples had no served score and are left out above"
        )
    lines.append(f"Verdict: {normalized_entropy_verdict(result, report)}")
    # Imported here because the experiment modules import this one.
    from shared.replay.experiments.verdicts import overall_verdict

    target_verdict = overall_verdict(result)
    if target_verdict is not None:
        lines.extend(wrap_line(f"Targets: {target_verdict}"))
    return lines


def _prelearn_lines(result: ReplayResult, report: dict[str, Any]) -> list[str]:
    columns = [result.config.model, BASELINE_MODEL]
    metrics = [
        ("log_loss", "log loss"),
        ("normalized_entropy", "normalised entropy"),
        ("auc", "AUC"),
    ]
    lines = _table("Pre-learn scores", columns, _metric_rows(report["prelearn"], metrics))
    lines.append(
        "  Pre-learn scores come from the model just before it learns each example, so they use"
    )
    lines.append(
        "  every label decided before it; their gap to served scores is the cost of label delay."
    )
    if result.config.holdout_from is not None and result.config.after_holdout == "freeze":
        lines.append(
            "  Learning stops at the holdout time, so evaluated examples have no pre-learn scores."
        )
    served_ne = report["served"]["model"]["normalized_entropy"]
    prelearn_ne = report["prelearn"]["model"]["normalized_entropy"]
    if served_ne is not None and prelearn_ne is not None:
        lines.append(
            f"  {result.config.model} normalised entropy, served minus pre-learn: "
            f"{served_ne - prelearn_ne:+.4f} ({served_ne:.4f} vs {prelearn_ne:.4f})"
        )
    return lines


def _rolling_lines(result: ReplayResult, report: dict[str, Any]) -> list[str]:
    rolling = report["rolling"]
    count = rolling["model"]["count"]
    columns = [result.config.model, BASELINE_MODEL]
    metrics = [("normalized_entropy", "normalised entropy"), ("auc", "AUC")]
    lines = _table("Rolling window", columns, _metric_rows(rolling, metrics))
    lines.append(f"  over the last {count:,} served examples (window of {rolling['window']:,})")
    return lines


def _delay_lines(result: ReplayResult) -> list[str]:
    quantiles = label_delay_quantiles(result.positive_delays)
    cells = "   ".join(f"{name} {format_duration(value)}" for name, value in quantiles.items())
    return [f"Positive label delay ({len(result.positive_delays):,} clicks)", f"  {cells}"]


def _count_lines(title: str, counts: dict[str, int], max_per_line: int) -> list[str]:
    name_width = max((len(name) for name in counts), default=0) + 1
    count_width = max((len(f"{count:,}") for count in counts.values()), default=0) + 1
    cell_width = name_width + count_width
    gap = "    "
    fits = max(1, (SUMMARY_WIDTH - 2 + len(gap)) // (cell_width + len(gap)))
    per_line = min(max_per_line, fits)

    cells = [
        name.ljust(name_width) + f"{count:,}".rjust(count_width) for name, count in counts.items()
    ]
    lines = [title]
    for start in range(0, len(cells), per_line):
        lines.append("  " + gap.join(cells[start : start + per_line]))
    return lines


def format_summary(result: ReplayResult, report: dict[str, Any] | None = None) -> str:
    """Format a replay's result as a plain-text table for the console, at most 100 columns wide.

    ``report`` is ``result.evaluation.report()`` when the caller already has it.
    """
    if report is None:
        report = result.evaluation.report()
    parts = [
        _header_lines(result),
        _served_lines(result, report),
        _prelearn_lines(result, report),
        _rolling_lines(result, report),
        _delay_lines(result),
        _count_lines("Join outcomes", join_outcome_counts(result), max_per_line=2),
        _count_lines("Labels by source", label_source_counts(result), max_per_line=3),
        *(section.summary_lines(result) for section in sections()),
    ]
    return "\n\n".join("\n".join(lines) for lines in parts if lines) + "\n"
