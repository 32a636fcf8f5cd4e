"""Write a replay's report: metrics.json, config.json, timeline.csv, PNG plots and index.html.

``metrics.json``, ``config.json`` and ``timeline.csv`` hold no wall-clock numbers, so the same
events and settings always give the same bytes. The PNG files carry no
software-version metadata. ``index.html`` embeds the console summary, which
does include the wall time, so it differs between runs.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.learn.models import BASELINE_MODEL
from shared.metrics.binary import BinaryMetrics
from shared.replay.experiments import sections
from shared.replay.runner import ReplayResult
from shared.replay.summary import (
    format_count,
    format_duration,
    format_event_time,
    format_metric,
    format_summary,
    holdout_facts,
    join_outcome_counts,
    label_delay_quantiles,
    label_source_counts,
    normalized_entropy_verdict,
)

METRICS_FILE = "metrics.json"
# Every setting of the run, in the form `online-ctr replay --config` reads.
CONFIG_FILE = "config.json"
TIMELINE_FILE = "timeline.csv"
INDEX_FILE = "index.html"
NORMALIZED_ENTROPY_PLOT = "normalized_entropy.png"
LOG_LOSS_PLOT = "log_loss.png"
CALIBRATION_PLOT = "calibration.png"
LABEL_DELAY_PLOT = "label_delay.png"

# metrics.json lists this many invalid lines, and its count covers all of them.
MAX_INVALID_LINES_LISTED = 20
# Calibration bins hold equal numbers of served examples, at least this many
# each, so that a bin's observed click rate is not pure noise.
MAX_CALIBRATION_BINS = 15
MIN_CALIBRATION_BIN_EXAMPLES = 100
# The z value of a two-sided 95 % interval, for the Wilson interval of a bin's click rate.
WILSON_Z = 1.96
MAX_DELAY_HISTOGRAM_BINS = 60
# Time plots cut their y axis at this quantile of the plotted values times the
# headroom, so that the early, noisy windows do not flatten the steady state.
BULK_QUANTILE = 0.9
BULK_HEADROOM = 1.25

_ARMS = ("model", "baseline")
_ARM_COLORS = {"model": "tab:blue", "baseline": "tab:orange"}
_FIGURE_SIZE_INCHES = (9.0, 4.8)
_FIGURE_DPI = 110
# Agg writes "Software: matplotlib version ..." into each PNG unless this metadata removes it.
_PNG_METADATA = {"Software": None}


def write_report(result: ReplayResult, directory: Path) -> Path:
    """Write a replay's report files into ``directory``, creating it, and return index.html."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = result.evaluation.report()

    document = _finite_json(_metrics_document(result, report))
    metrics_text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
    (directory / METRICS_FILE).write_bytes((metrics_text + "\n").encode("utf-8"))
    (directory / TIMELINE_FILE).write_bytes(_timeline_csv(result.timeline).encode("utf-8"))
    config = {"report": str(directory), **result.config.model_dump(mode="json")}
    config_text = json.dumps(config, indent=2, ensure_ascii=False)
    (directory / CONFIG_FILE).write_bytes((config_text + "\n").encode("utf-8"))

    _plot_normalized_entropy(result, directory / NORMALIZED_ENTROPY_PLOT)
    _plot_log_loss(result, directory / LOG_LOSS_PLOT)
    _plot_calibration(result, directory / CALIBRATION_PLOT)
    _plot_label_delay(result, directory / LABEL_DELAY_PLOT)

    # Experiment sections write their own plots; render them before the page.
    experiments = "".join(section.html_section(result, directory) for section in sections())
    index = directory / INDEX_FILE
    index.write_bytes(_render_html(result, report, experiments).encode("utf-8"))
    return index


# metrics.json and timeline.csv.


def _metrics_document(result: ReplayResult, report: dict[str, Any]) -> dict[str, Any]:
    first, last = result.first_event_time, result.last_event_time
    span = None if first is None or last is None else last - first
    invalid = [
        {"line_number": line.line_number, "reason": line.error.reason, "message": str(line.error)}
        for line in result.invalid_lines[:MAX_INVALID_LINES_LISTED]
    ]
    return {
        "config": result.config.model_dump(mode="json"),
        "events": {
            "total": result.events,
            "impressions": result.impressions,
            "clicks": result.clicks,
            "invalid_lines": len(result.invalid_lines),
        },
        "invalid_lines": invalid,
        "event_time": {
            "first": format_event_time(first) if first is not None else None,
            "last": format_event_time(last) if last is not None else None,
            "first_seconds": first,
            "last_seconds": last,
            "span_seconds": span,
        },
        "evaluation": report,
        "experiments": {
            section.NAME: document
            for section in sections()
            if (document := section.document(result)) is not None
        },
        "join_outcomes": join_outcome_counts(result),
        "label_sources": label_source_counts(result),
        "positive_label_delay_seconds": {
            "count": len(result.positive_delays),
            **label_delay_quantiles(result.positive_delays),
        },
    }


def _finite_json(value: Any) -> Any:
    """Replace infinite and NaN floats by their names, which strict JSON cannot hold as numbers.

    Settings such as ``allowed_lateness_seconds`` accept infinity.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value


def _timeline_csv(timeline: Sequence[dict[str, Any]]) -> str:
    """Render timeline rows as CSV: the UTC time first, then every key in first-seen order."""
    columns = ["event_time_utc", "event_time"]
    for row in timeline:
        columns.extend(key for key in row if key not in columns)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in timeline:
        event_time = row.get("event_time")
        cells = {
            **row,
            "event_time_utc": format_event_time(event_time) if event_time is not None else None,
        }
        writer.writerow(["" if cells.get(column) is None else cells[column] for column in columns])
    return buffer.getvalue()


# Plots.


def _new_figure() -> tuple[Figure, Any]:
    # A Figure with its own Agg canvas leaves pyplot's global backend and state alone.
    figure = Figure(figsize=_FIGURE_SIZE_INCHES, dpi=_FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.grid(True, alpha=0.3)
    return figure, axes


def _save(figure: Figure, path: Path) -> None:
    figure.savefig(path, format="png", metadata=_PNG_METADATA)


def _show_message(axes: Any, message: str) -> None:
    """Put a message in place of data, on axes without ticks, which would mean nothing."""
    axes.set_xticks([])
    axes.set_yticks([])
    axes.grid(False)
    axes.text(
        0.5,
        0.5,
        message,
        transform=axes.transAxes,
        ha="center",
        va="center",
        fontsize=12,
        wrap=True,
    )


def _timeline_points(
    result: ReplayResult, keys: Sequence[str]
) -> tuple[list[dt.datetime], dict[str, np.ndarray]]:
    """Return the timeline's event times as UTC datetimes and each key's values, None as NaN."""
    rows = [row for row in result.timeline if row.get("event_time") is not None]
    times = [dt.datetime.fromtimestamp(row["event_time"], dt.UTC) for row in rows]
    values = {
        key: np.array([math.nan if row.get(key) is None else row[key] for row in rows], dtype=float)
        for key in keys
    }
    return times, values


def _cut_y_axis_above_bulk(
    axes: Any, series: Sequence[np.ndarray], title: str, minimum_top: float
) -> None:
    """Cut the y axis above most of the values, so a start-up spike does not flatten the rest.

    The title states where the axis was cut and what the maximum was, so nothing is hidden.
    """
    values = np.concatenate([np.asarray(values, dtype=float) for values in series])
    values = values[np.isfinite(values)]
    if values.size == 0:
        axes.set_title(title)
        return
    top = max(minimum_top, float(np.quantile(values, BULK_QUANTILE)) * BULK_HEADROOM)
    maximum = float(values.max())
    if maximum <= top:
        axes.set_title(title)
        return
    axes.set_ylim(top=top)
    axes.set_title(
        f"{title}\n(y axis cut at {top:.3g}; the maximum, {maximum:.3g}, is off the plot)"
    )


def _arm_label(result: ReplayResult, arm: str) -> str:
    return result.config.model if arm == "model" else f"{BASELINE_MODEL} (baseline)"


def _plot_normalized_entropy(result: ReplayResult, path: Path) -> None:
    window = result.config.rolling_window
    keys = [f"{arm}_rolling_normalized_entropy" for arm in _ARMS]
    times, values = _timeline_points(result, keys)
    figure, axes = _new_figure()
    title = f"Rolling normalised entropy of served scores (last {window:,} examples)"
    axes.set_title(title)
    axes.set_xlabel("event time of the label decision (UTC)")
    axes.set_ylabel("normalised entropy (log loss / entropy of click rate)")

    if all(np.isnan(values[key]).all() for key in keys):
        _show_message(axes, "No normalised entropy: no window had both clicks and non-clicks.")
    else:
        marker = "o" if len(times) < 30 else None
        for arm, key in zip(_ARMS, keys, strict=True):
            axes.plot(
                times,
                values[key],
                color=_ARM_COLORS[arm],
                marker=marker,
                label=_arm_label(result, arm),
            )
        axes.axhline(
            1.0,
            color="black",
            linestyle="--",
            linewidth=1,
            label="1.0 = predicting the window's click rate",
        )
        _cut_y_axis_above_bulk(axes, list(values.values()), title, minimum_top=1.2)
        axes.legend(loc="best")
    _save(figure, path)


def _plot_log_loss(result: ReplayResult, path: Path) -> None:
    window = result.config.rolling_window
    keys = [f"{arm}_{kind}" for arm in _ARMS for kind in ("log_loss", "rolling_log_loss")]
    times, values = _timeline_points(result, keys)
    figure, axes = _new_figure()
    title = "Log loss of served scores over event time"
    axes.set_title(title)
    axes.set_xlabel("event time of the label decision (UTC)")
    axes.set_ylabel("log loss (nats per example)")

    if not times or all(np.isnan(values[key]).all() for key in keys):
        _show_message(axes, "No served examples.")
    else:
        marker = "o" if len(times) < 30 else None
        for arm in _ARMS:
            color, label = _ARM_COLORS[arm], _arm_label(result, arm)
            axes.plot(
                times,
                values[f"{arm}_log_loss"],
                color=color,
                marker=marker,
                label=f"{label}, cumulative",
            )
            axes.plot(
                times,
                values[f"{arm}_rolling_log_loss"],
                color=color,
                linestyle=":",
                marker=marker,
                label=f"{label}, last {window:,} examples",
            )
        _cut_y_axis_above_bulk(axes, list(values.values()), title, minimum_top=0.0)
        axes.legend(loc="best")
    _save(figure, path)


@dataclass(frozen=True, slots=True)
class CalibrationBin:
    """One bin of a reliability diagram: served scores of similar size and their labels."""

    count: int
    mean_prediction: float
    observed_rate: float
    observed_low: float
    observed_high: float


def wilson_interval(positives: int, count: int, z: float = WILSON_Z) -> tuple[float, float]:
    """Return the Wilson score interval of a binomial rate, which stays in [0, 1] at 0 clicks."""
    rate = positives / count
    denominator = 1.0 + z * z / count
    center = (rate + z * z / (2 * count)) / denominator
    half_width = (
        z * math.sqrt(rate * (1.0 - rate) / count + z * z / (4 * count * count)) / denominator
    )
    return max(0.0, center - half_width), min(1.0, center + half_width)


def calibration_bins(scores: np.ndarray, labels: np.ndarray) -> list[CalibrationBin]:
    """Split served scores into equal-count bins by score, splitting ties in arrival order."""
    count = len(scores)
    if count == 0:
        return []
    bin_count = min(MAX_CALIBRATION_BINS, max(1, count // MIN_CALIBRATION_BIN_EXAMPLES))
    order = np.argsort(scores, kind="stable")
    bins = []
    for members in np.array_split(order, bin_count):
        positives = int(labels[members].sum())
        low, high = wilson_interval(positives, len(members))
        bins.append(
            CalibrationBin(
                count=len(members),
                mean_prediction=float(scores[members].mean()),
                observed_rate=positives / len(members),
                observed_low=low,
                observed_high=high,
            )
        )
    return bins


def _served_scores(result: ReplayResult, arm: str) -> tuple[np.ndarray, np.ndarray]:
    metrics: BinaryMetrics = result.evaluation.served[arm]
    return metrics.scores_and_labels()


def _plot_calibration(result: ReplayResult, path: Path) -> None:
    figure, axes = _new_figure()
    axes.set_title("Calibration of served scores (equal-count score bins, 95 % Wilson intervals)")
    axes.set_xlabel("mean predicted click rate in bin")
    axes.set_ylabel("observed click rate in bin")
    bins = {arm: calibration_bins(*_served_scores(result, arm)) for arm in _ARMS}
    if not any(bins.values()):
        _show_message(axes, "No served examples, so no calibration.")
        _save(figure, path)
        return

    # Click rates span orders of magnitude, so both axes are logarithmic. A bin
    # without clicks is drawn on the lower edge with an open marker.
    positive_values = [
        value
        for arm_bins in bins.values()
        for item in arm_bins
        for value in (item.mean_prediction, item.observed_rate, item.observed_low)
        if value > 0
    ]
    upper_values = [item.observed_high for arm_bins in bins.values() for item in arm_bins]
    floor = min(positive_values, default=1e-4) / 2.0
    ceiling = min(1.0, max(upper_values + positive_values) * 1.5)
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.plot(
        [floor, ceiling],
        [floor, ceiling],
        color="black",
        linestyle="--",
        linewidth=1,
        label="perfect calibration",
    )

    for arm, arm_bins in bins.items():
        if not arm_bins:
            continue
        predicted = np.array([item.mean_prediction for item in arm_bins])
        observed = np.array([max(item.observed_rate, floor) for item in arm_bins])
        low = np.array([max(item.observed_low, floor) for item in arm_bins])
        high = np.array([item.observed_high for item in arm_bins])
        bin_size = arm_bins[0].count
        axes.errorbar(
            np.maximum(predicted, floor),
            observed,
            yerr=[observed - low, high - observed],
            color=_ARM_COLORS[arm],
            marker="o",
            linestyle="-",
            capsize=3,
            label=f"{_arm_label(result, arm)}: {len(arm_bins)} bins of ~{bin_size:,} examples",
        )
        zero = np.array([item.observed_rate == 0 for item in arm_bins])
        if zero.any():
            axes.scatter(
                np.maximum(predicted[zero], floor),
                observed[zero],
                facecolors="white",
                edgecolors=_ARM_COLORS[arm],
                zorder=3,
                s=50,
                label=f"{_arm_label(result, arm)}: bin without clicks",
            )
    axes.set_xlim(floor, ceiling)
    axes.set_ylim(floor, ceiling)
    axes.legend(loc="upper left")
    _save(figure, path)


def _plot_label_delay(result: ReplayResult, path: Path) -> None:
    delays = np.asarray(result.positive_delays, dtype=float)
    figure, axes = _new_figure()
    axes.set_title(f"Delay from impression to click, positive labels ({len(delays):,} clicks)")
    axes.set_xlabel("label delay (minutes)")
    axes.set_ylabel("clicks per bin")
    if delays.size == 0:
        _show_message(axes, "No positive labels, so there are no label delays to show.")
        _save(figure, path)
        return
    if not delays.any():
        _show_message(axes, f"All {delays.size:,} positive labels have a delay of 0 s.")
        _save(figure, path)
        return

    minutes = delays / 60.0
    bin_count = min(MAX_DELAY_HISTOGRAM_BINS, max(10, int(math.sqrt(minutes.size))))
    axes.hist(
        minutes,
        bins=bin_count,
        range=(0.0, float(minutes.max())),
        color="tab:blue",
        alpha=0.6,
        label="clicks per bin",
    )
    quantiles = label_delay_quantiles(result.positive_delays)
    for (name, seconds), style in zip(quantiles.items(), ("--", "-.", ":", "-"), strict=True):
        axes.axvline(
            seconds / 60.0,
            color="gray",
            linestyle=style,
            linewidth=1,
            label=f"{name} = {format_duration(seconds)}",
        )

    cdf_axes = axes.twinx()
    ordered = np.sort(minutes)
    shares = np.arange(1, ordered.size + 1) / ordered.size
    cdf_axes.step(
        ordered, shares, where="post", color="tab:red", label="share of clicks with delay ≤ x"
    )
    cdf_axes.set_ylim(0.0, 1.02)
    cdf_axes.set_ylabel("share of clicks with delay ≤ x (empirical CDF)")

    handles, labels = axes.get_legend_handles_labels()
    cdf_handles, cdf_labels = cdf_axes.get_legend_handles_labels()
    axes.legend(handles + cdf_handles, labels + cdf_labels, loc="center right")
    _save(figure, path)


# index.html.

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222;
       padding: 0 1rem; line-height: 1.45; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; font-size: 0.92rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; }
th { background: #f3f3f3; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.worse td { background: #fde2e1; }
.verdict { font-size: 1.1rem; font-weight: 600; padding: 0.5rem 0.8rem; background: #eef5ff;
           border-left: 4px solid #3b7dd8; }
.verdict.worse { background: #fde2e1; border-left-color: #c0392b; }
.verdict.none { background: #f3f3f3; border-left-color: #888; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; max-width: 60rem; }
.note { color: #555; font-size: 0.9rem; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }
"""

_METRIC_ROWS = (
    ("count", "examples"),
    ("positives", "positives"),
    ("click_rate", "click rate"),
    ("log_loss", "log loss"),
    ("normalized_entropy", "normalised entropy"),
    ("auc", "AUC"),
    ("calibration", "calibration (predicted / observed clicks)"),
    ("mean_prediction", "mean prediction"),
)


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _cell(text: str, number: bool = True) -> str:
    css_class = ' class="number"' if number else ""
    return f"<td{css_class}>{_escape(text)}</td>"


def _table(headers: Sequence[str], rows: Sequence[str]) -> str:
    head = "".join(f"<th>{_escape(header)}</th>" for header in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _run_section(result: ReplayResult) -> str:
    config = result.config
    first, last = result.first_event_time, result.last_event_time
    span = None if first is None or last is None else last - first
    rate = f"{result.events / result.wall_seconds:,.0f}" if result.wall_seconds > 0 else "n/a"
    facts = [
        ("input", str(config.events)),
        (
            "events read",
            f"{result.events:,} ({result.impressions:,} impressions, {result.clicks:,} clicks)",
        ),
        ("invalid lines skipped", f"{len(result.invalid_lines):,}"),
        (
            "event time",
            f"{format_event_time(first)} to {format_event_time(last)} ({format_duration(span)})",
        ),
        ("wall time", f"{format_duration(result.wall_seconds)} ({rate} events/s)"),
        ("model / baseline", f"{config.model} / {BASELINE_MODEL}"),
        (
            "join",
            f"window {format_duration(config.join.window_seconds)}, allowed lateness "
            f"{format_duration(config.join.allowed_lateness_seconds)}, late clicks: "
            f"{config.join.late_click_policy.value}",
        ),
        ("segments", ", ".join(config.segment_by) or "none"),
    ]
    holdout = holdout_facts(result)
    if holdout is not None:
        facts.append(("holdout", "; ".join(holdout)))
    rows = [
        f"<tr><th>{_escape(name)}</th>{_cell(value, number=False)}</tr>" for name, value in facts
    ]
    return "<h2>Run</h2>" + f"<table><tbody>{''.join(rows)}</tbody></table>"


def _verdict_paragraph(result: ReplayResult, report: dict[str, Any]) -> str:
    model_ne = report["served"]["model"]["normalized_entropy"]
    baseline_ne = report["served"]["baseline"]["normalized_entropy"]
    css_class = "verdict"
    if model_ne is None or baseline_ne is None:
        css_class = "verdict none"
    elif model_ne >= baseline_ne:
        css_class = "verdict worse"
    paragraph = f'<p class="{css_class}">{_escape(normalized_entropy_verdict(result, report))}</p>'
    # Imported here because the experiment modules import this one.
    from shared.replay.experiments.verdicts import target_paragraph

    return paragraph + target_paragraph(result)


def _comparison_section(result: ReplayResult, report: dict[str, Any]) -> str:
    model = result.config.model
    window = report["rolling"]["window"]
    headers = ["metric"]
    sources = []
    for kind, title in (
        ("served", "served"),
        ("prelearn", "pre-learn"),
        ("rolling", f"last {window:,}"),
    ):
        for arm in _ARMS:
            headers.append(f"{model if arm == 'model' else BASELINE_MODEL}, {title}")
            sources.append(report[kind][arm])

    rows = [
        f"<tr><th>{_escape(label)}</th>"
        + "".join(_cell(format_metric(name, source[name])) for source in sources)
        + "</tr>"
        for name, label in _METRIC_ROWS
    ]

    unserved = report["unserved_examples"]
    unserved_note = ""
    if unserved:
        unserved_note = (
            f'<p class="note">{unserved:,} examples had no served score, so they count only in '
            "the pre-learn columns.</p>"
        )

    return (
        "<h2>Model vs baseline</h2>"
        + _verdict_paragraph(result, report)
        + _table(headers, rows)
        + unserved_note
        + '<p class="note">Served scores are what each impression was shown with. Pre-learn scores '
        "come from the model just before it learns each example, so they use every label decided "
        "before it. The gap between the two is the cost of the label delay. The last columns "
        f"cover the rolling window of the last {window:,} served examples. Lower log loss and "
        "normalised entropy are better, and normalised entropy below 1 beats predicting the "
        "observed click rate.</p>"
    )


def _plots_section(result: ReplayResult) -> str:
    window = f"{result.config.rolling_window:,}"
    join = result.config.join
    captions = (
        (
            NORMALIZED_ENTROPY_PLOT,
            f"Normalised entropy over the last {window} served examples, at the event time each "
            "row was recorded. Below the dashed line at 1.0 the scores beat predicting the "
            "window's own click rate, and the lower line is the better model at that time.",
        ),
        (
            LOG_LOSS_PLOT,
            "Solid lines are the log loss of all served scores so far, dotted lines that of the "
            f"last {window} examples. Compare model and baseline at the same time, because the "
            "level moves with the click rate.",
        ),
        (
            CALIBRATION_PLOT,
            "Each arm's served scores are sorted into bins of equal count. A point is a bin's "
            "mean prediction against its observed click rate, with a 95 % Wilson interval. "
            "Points on the diagonal are calibrated, and points below it over-predict.",
        ),
        (
            LABEL_DELAY_PLOT,
            "Time from impression to the click that made its label positive. Bars count clicks, "
            "and the red line is the share that arrived within that delay. Clicks later than the "
            f"attribution window of {format_duration(join.window_seconds)} never become positive "
            "labels here.",
        ),
    )
    figures = [
        f'<figure><img src="{_escape(name)}" alt="{_escape(name)}">'
        f"<figcaption>{_escape(caption)}</figcaption></figure>"
        for name, caption in captions
    ]
    return "<h2>Plots</h2>" + "".join(figures)


def _delay_section(result: ReplayResult) -> str:
    quantiles = label_delay_quantiles(result.positive_delays)
    headers = ["positive labels", *quantiles]
    row = (
        "<tr>"
        + _cell(format_count(len(result.positive_delays)))
        + "".join(_cell(format_duration(value)) for value in quantiles.values())
        + "</tr>"
    )
    return "<h2>Positive label delay</h2>" + _table(headers, [row])


def _counts_section(result: ReplayResult) -> str:
    outcome_rows = [
        f"<tr><td>{_escape(name)}</td>{_cell(format_count(count))}</tr>"
        for name, count in join_outcome_counts(result).items()
    ]
    source_rows = [
        f"<tr><td>{_escape(name)}</td>{_cell(format_count(count))}</tr>"
        for name, count in label_source_counts(result).items()
    ]
    return (
        "<h2>Join outcomes</h2>"
        + _table(["outcome", "count"], outcome_rows)
        + "<h2>Labels by source</h2>"
        + _table(["label source", "examples"], source_rows)
    )


def _invalid_section(result: ReplayResult) -> str:
    if not result.invalid_lines:
        return ""
    rows = [
        f"<tr>{_cell(str(line.line_number))}{_cell(line.error.reason, number=False)}"
        f"{_cell(str(line.error), number=False)}</tr>"
        for line in result.invalid_lines[:MAX_INVALID_LINES_LISTED]
    ]
    listed = min(len(result.invalid_lines), MAX_INVALID_LINES_LISTED)
    return f"<h2>Invalid lines (first {listed:,} of {len(result.invalid_lines):,})</h2>" + _table(
        ["line", "reason", "error"], rows
    )


def _render_html(result: ReplayResult, report: dict[str, Any], experiments: str) -> str:
    title = f"online-ctr replay: {result.config.events}"
    config_json = json.dumps(result.config.model_dump(mode="json"), indent=2, ensure_ascii=False)
    body = "".join(
        [
            f"<h1>{_escape(title)}</h1>",
            _run_section(result),
            _comparison_section(result, report),
            _plots_section(result),
            experiments,
            _delay_section(result),
            _counts_section(result),
            _invalid_section(result),
            "<h2>Console summary</h2>",
            f"<pre>{_escape(format_summary(result, report))}</pre>",
            "<h2>Configuration</h2>",
            f"<pre>{_escape(config_json)}</pre>",
        ]
    )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{_escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )
