"""Attribution-window what-if: how many clicks each window misses, and what that costs the model.

The same stream is replayed once per window with the main model alone. For
each window the experiment reports:

- the missed-click share: clicks later than the window, over every click that
  matched an impression;
- the fake-negative share: impressions labelled negative when their window
  closed that got a click later, over every negative;
- log loss, normalised entropy and calibration of the served scores, both
  against that window's labels and against the final labels (every click
  that ever matched), which puts all windows on the same labels.

Click delays are matched from the stream's own timestamps, apart from any
join, so the join's late-click count of each window can be checked against
them. A join removes a decided impression's record ``closed_retention_seconds``
after its window. A click later than window plus retention plus allowed
lateness is therefore counted there as an orphan, not as late.
"""

from __future__ import annotations

import itertools
import logging
import math
import textwrap
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import FixedLocator, NullLocator

from shared.events import Click, Impression, LabeledExample, LabelSource
from shared.join import JoinOutcome, JoinSettings
from shared.metrics.binary import BinaryMetrics, BinaryReport
from shared.replay.report import _cell, _escape, _new_figure, _save, _show_message, _table
from shared.replay.runner import (
    REPLAY_BATCH_EVENTS,
    Replay,
    ReplayConfig,
    ReplayResult,
    load_snapshot_file,
)
from shared.replay.summary import (
    SUMMARY_WIDTH,
    format_count,
    format_duration,
    format_metric,
    format_rate,
    label_delay_quantiles,
)
from shared.streams.recorded import InvalidLine, read_events

logger = logging.getLogger(__name__)

NAME = "windows"
CDF_PLOT = "window_label_delay_cdf.png"
# The CDF is drawn through at most this many of the sorted delays, always
# including the last, so a stream with millions of clicks still plots quickly.
MAX_CDF_POINTS = 5_000
# Tick marks of the log time axis, in seconds, with their labels.
_TIME_TICKS = (
    (0.001, "1 ms"),
    (0.01, "10 ms"),
    (0.1, "100 ms"),
    (1.0, "1 s"),
    (10.0, "10 s"),
    (60.0, "1 min"),
    (600.0, "10 min"),
    (3_600.0, "1 h"),
    (6 * 3_600.0, "6 h"),
    (86_400.0, "1 d"),
    (7 * 86_400.0, "7 d"),
    (30 * 86_400.0, "30 d"),
    (365 * 86_400.0, "365 d"),
)
_WINDOW_COLUMN_WIDTH = 12
_COLUMN_WIDTH = 12


class ClickDelays:
    """Each impression's click as matched from the stream alone, with no join involved.

    An impression counts once, at the first event with its id. Its click is
    the first click in file order at or after the impression's event time. A
    click read before its impression is held until the impression arrives.
    """

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.impression_times = array("d")
        # NaN for an impression without a matched click.
        self.click_times = array("d")
        self.clicks_before_impression = 0
        self._held: dict[str, list[float]] = {}

    def add(self, events: Iterable[Impression | Click]) -> None:
        """Index impressions and match clicks, in file order."""
        for event in events:
            if event.type == "impression":
                self._add_impression(event)
            else:
                self._add_click(event)

    def _add_impression(self, impression: Impression) -> None:
        impression_id = impression.impression_id
        if impression_id in self.index:
            return
        self.index[impression_id] = len(self.impression_times)
        self.impression_times.append(impression.ts)
        self.click_times.append(math.nan)
        for click_time in self._held.pop(impression_id, ()):
            self._match(impression_id, click_time)

    def _add_click(self, click: Click) -> None:
        if click.impression_id in self.index:
            self._match(click.impression_id, click.ts)
        else:
            self._held.setdefault(click.impression_id, []).append(click.ts)

    def _match(self, impression_id: str, click_time: float) -> None:
        position = self.index[impression_id]
        if not math.isnan(self.click_times[position]):
            return
        if click_time < self.impression_times[position]:
            self.clicks_before_impression += 1
            return
        self.click_times[position] = click_time

    @property
    def unmatched_clicks(self) -> int:
        """Clicks whose impression id never appeared in the stream."""
        return sum(len(times) for times in self._held.values())

    def to_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """Return impression times and click times (NaN without a click) as numpy arrays."""
        return np.array(self.impression_times), np.array(self.click_times)


@dataclass(frozen=True)
class WindowOutcome:
    """The measurements of one attribution window on the stream."""

    window_seconds: float
    retention_seconds: float
    # Whether this is the window of the main replay.
    main: bool
    matched_clicks: int
    # Matched clicks later than the window, from the stream's timestamps.
    missed_clicks: int
    # Late clicks as the join of this window counted them.
    join_late_clicks: int
    # Missed clicks after window + retention + allowed lateness, which the
    # join no longer recognises as late and counts as orphan clicks.
    missed_after_retention: int
    # Impressions the join labelled negative when their window closed.
    negatives: int
    # Those negatives that have a matched click in the stream.
    fake_negatives: int
    # Served scores of the main model against this window's labels.
    served: BinaryReport
    # The same served scores against the final labels: every matched click counts.
    served_final: BinaryReport

    @property
    def missed_click_share(self) -> float | None:
        """Missed over matched clicks, None without matched clicks."""
        return self.missed_clicks / self.matched_clicks if self.matched_clicks else None

    @property
    def join_unexplained(self) -> int:
        """Missed clicks the join counted differently for reasons other than retention.

        It is zero for a stream in event-time order. Events out of order can
        make a click inside its window late, or hold a late click as an orphan.
        """
        return self.missed_clicks - self.missed_after_retention - self.join_late_clicks

    @property
    def fake_negative_share(self) -> float | None:
        """Fake negatives over negatives, None without negatives."""
        return self.fake_negatives / self.negatives if self.negatives else None


@dataclass(frozen=True)
class WhatIfResult:
    """The outcome of every what-if window, shortest first, and the stream's click delays."""

    model: str
    main_window_seconds: float
    max_missed_click_share: float
    windows: list[WindowOutcome]
    # Delays in seconds from impression to matched click, sorted.
    delays: np.ndarray
    impressions: int
    unmatched_clicks: int
    clicks_before_impression: int
    invalid_lines: int

    @property
    def matched_clicks(self) -> int:
        """Clicks that matched an impression of the stream."""
        return int(self.delays.size)

    @property
    def recommended(self) -> WindowOutcome | None:
        """The smallest window whose missed-click share is at most the maximum, if any."""
        for outcome in self.windows:
            share = outcome.missed_click_share
            if share is not None and share <= self.max_missed_click_share:
                return outcome
        return None

    def recommendation(self) -> str:
        """State the recommended window, or why there is none, in one sentence."""
        maximum = format_rate(self.max_missed_click_share)
        if self.matched_clicks == 0:
            return (
                "No window recommended: no click in the stream matched an impression, so no "
                "window has a missed-click share."
            )
        chosen = self.recommended
        if chosen is None:
            longest = self.windows[-1]
            return (
                "No window qualifies: even the longest, "
                f"{format_duration(longest.window_seconds)}, misses "
                f"{format_rate(longest.missed_click_share)} of clicks, more than the maximum of "
                f"{maximum}. Try longer windows."
            )
        return (
            f"Recommended window: {format_duration(chosen.window_seconds)}, the smallest of the "
            f"{len(self.windows)} tried that misses at most {maximum} of clicks "
            f"(it misses {format_rate(chosen.missed_click_share)})."
        )


# Running the what-if.


class _WindowRun:
    """One window's replay, and the impressions it labelled negative and evaluated, in order."""

    def __init__(self, config: ReplayConfig, delays: ClickDelays, bundle: Any) -> None:
        self.config = config
        self.replay = Replay(config, on_example=self._on_example, initial_bundle=bundle)
        self._delays = delays
        self.negatives = array("q")
        self.evaluated = array("q")

    def _on_example(self, example: LabeledExample) -> None:
        position = self._delays.index[example.impression.impression_id]
        if example.label_source == LabelSource.WINDOW_CLOSED:
            self.negatives.append(position)
        # The replay calls back after the arms learned the example, so a new
        # served count means this example was evaluated, in that order.
        if self.replay.learner.evaluation.served["model"].count > len(self.evaluated):
            self.evaluated.append(position)


def what_if_config(config: ReplayConfig, window_seconds: float) -> ReplayConfig:
    """Return the main replay's settings with another window, for the main model alone.

    A retention equal to the main window, which is the default, becomes the
    new window, and any other retention is kept as set.
    """
    join = config.join
    retention = join.retention_seconds
    if retention == join.window_seconds:
        retention = window_seconds
    settings = join.model_dump() | {
        "window_seconds": window_seconds,
        "closed_retention_seconds": retention,
    }
    return config.model_copy(
        update={
            "join": JoinSettings(**settings),
            "compare": [],
            "freshness": False,
            "what_if_windows": [],
            "segment_by": [],
        }
    )


def run_what_if(
    config: ReplayConfig,
    events: Path,
    on_progress: Callable[[int], None] | None = None,
) -> WhatIfResult:
    """Replay ``events`` once per window of ``config.what_if_windows`` in one pass over the file.

    Every window's replay takes each batch of events in step, so the file is
    read once. ``on_progress`` receives the bytes read so far.

    NOTE: the stream's click matching keeps one entry per distinct impression
    (its id, impression time and click time) for the whole run: 90 bytes per
    impression measured with tracemalloc on CPython 3.11, plus the id string
    of about 60 bytes. Each window adds 8 bytes per evaluated example and per
    negative, so four windows come to an estimated 200 bytes per impression.
    """
    windows = sorted(set(config.what_if_windows))
    if not windows:
        raise ValueError(
            "what_if_windows is empty; give at least one attribution window in seconds"
        )
    bundle = None
    if config.initial_snapshot is not None:
        bundle = load_snapshot_file(config.initial_snapshot)

    delays = ClickDelays()
    runs = [_WindowRun(what_if_config(config, window), delays, bundle) for window in windows]
    logger.info(
        "window what-if: replaying %s with model %s for windows %s",
        events,
        config.model,
        ", ".join(format_duration(window) for window in windows),
    )

    invalid: list[InvalidLine] = []
    stream = iter(read_events(events, invalid, on_progress))
    while batch := tuple(itertools.islice(stream, REPLAY_BATCH_EVENTS)):
        # The clicks are matched first, so every example a replay decides
        # in this batch finds its impression indexed.
        delays.add(batch)
        for run in runs:
            run.replay.feed(batch)
    for run in runs:
        run.replay.finish()

    result = _what_if_result(config, runs, delays, len(invalid))
    logger.info("window what-if: %s", result.recommendation())
    return result


def _what_if_result(
    config: ReplayConfig, runs: Sequence[_WindowRun], delays: ClickDelays, invalid_lines: int
) -> WhatIfResult:
    impression_times, click_times = delays.to_numpy()
    matched = ~np.isnan(click_times)
    outcomes = [
        _window_outcome(config, run, impression_times, click_times, matched) for run in runs
    ]
    return WhatIfResult(
        model=config.model,
        main_window_seconds=config.join.window_seconds,
        max_missed_click_share=config.max_missed_click_share,
        windows=outcomes,
        delays=np.sort(click_times[matched] - impression_times[matched]),
        impressions=len(impression_times),
        unmatched_clicks=delays.unmatched_clicks,
        clicks_before_impression=delays.clicks_before_impression,
        invalid_lines=invalid_lines,
    )


def _window_outcome(
    config: ReplayConfig,
    run: _WindowRun,
    impression_times: np.ndarray,
    click_times: np.ndarray,
    matched: np.ndarray,
) -> WindowOutcome:
    join = run.config.join
    window = join.window_seconds
    # The join's own arithmetic: a click at exactly the deadline is attributed,
    # and a decided impression is forgotten once the watermark reaches deadline
    # + retention. In a stream in event-time order, the watermark at a click is
    # the click time minus the allowed lateness.
    deadlines = impression_times[matched] + window
    clicks = click_times[matched]
    missed = clicks > deadlines
    forgotten = clicks - join.allowed_lateness_seconds >= deadlines + join.retention_seconds
    negatives = np.array(run.negatives, dtype=np.int64)

    evaluation = run.replay.learner.evaluation.served["model"]
    scores, _ = evaluation.scores_and_labels()
    evaluated = np.array(run.evaluated, dtype=np.int64)
    assert len(scores) == len(evaluated), "every evaluated example must have its impression index"

    result = run.replay.result
    return WindowOutcome(
        window_seconds=window,
        retention_seconds=join.retention_seconds,
        main=window == config.join.window_seconds,
        matched_clicks=int(np.count_nonzero(matched)),
        missed_clicks=int(np.count_nonzero(missed)),
        join_late_clicks=result.join_counts.get(JoinOutcome.CLICK_LATE, 0),
        missed_after_retention=int(np.count_nonzero(missed & forgotten)),
        negatives=len(negatives),
        fake_negatives=int(np.count_nonzero(matched[negatives])),
        served=evaluation.report(),
        served_final=_binary_report(scores, matched[evaluated]),
    )


def _binary_report(scores: np.ndarray, labels: np.ndarray) -> BinaryReport:
    metrics = BinaryMetrics()
    for score, label in zip(scores.tolist(), labels.tolist(), strict=True):
        metrics.update(score, int(label))
    return metrics.report()


# Console summary.


def _cross_check_lines(what_if: WhatIfResult) -> list[str]:
    differing = [
        outcome for outcome in what_if.windows if outcome.join_late_clicks != outcome.missed_clicks
    ]
    if not differing:
        return ["  The join's late-click counts match the stream's click delays for every window."]

    lines = []
    for outcome in differing:
        text = (
            f"{format_duration(outcome.window_seconds)}: the join counted "
            f"{outcome.join_late_clicks:,} of the {outcome.missed_clicks:,} late clicks. "
            f"{outcome.missed_after_retention:,} came after the window plus retention plus "
            "allowed lateness, where the join counts them as orphan clicks."
        )
        if outcome.join_unexplained:
            text += (
                f" {abs(outcome.join_unexplained):,} more differ because events arrived out "
                "of event-time order."
            )
        lines += textwrap.wrap(text, SUMMARY_WIDTH, initial_indent="  ", subsequent_indent="    ")
    return lines


def summary_lines(result: ReplayResult) -> list[str]:
    """Return the console lines of the what-if, or none when it did not run."""
    what_if: WhatIfResult | None = result.what_if
    if what_if is None:
        return []
    quantiles = label_delay_quantiles(what_if.delays.tolist())
    columns = ["missed", "fake neg", "log loss", "NE", "calib", "NE final", "calib final"]
    lines = [
        f"Attribution-window what-if ({what_if.model} replayed once per window, "
        f"{what_if.matched_clicks:,} matched clicks)",
        f"  label delay p50 {format_duration(quantiles['p50'])}, "
        f"p90 {format_duration(quantiles['p90'])}, p99 {format_duration(quantiles['p99'])}",
        "  window".ljust(_WINDOW_COLUMN_WIDTH)
        + "".join(column.rjust(_COLUMN_WIDTH) for column in columns),
    ]
    for outcome in what_if.windows:
        name = format_duration(outcome.window_seconds) + (" *" if outcome.main else "")
        cells = [
            format_rate(outcome.missed_click_share),
            format_rate(outcome.fake_negative_share),
            format_metric("log_loss", outcome.served.log_loss),
            format_metric("normalized_entropy", outcome.served.normalized_entropy),
            format_metric("calibration", outcome.served.calibration),
            format_metric("normalized_entropy", outcome.served_final.normalized_entropy),
            format_metric("calibration", outcome.served_final.calibration),
        ]
        lines.append(
            ("  " + name).ljust(_WINDOW_COLUMN_WIDTH)
            + "".join(cell.rjust(_COLUMN_WIDTH) for cell in cells)
        )
    lines += [
        "  * the main replay's window. missed: clicks later than the window, of matched clicks.",
        "  fake neg: negatives that got a click later. final: scored against every matched click.",
        *_cross_check_lines(what_if),
        *textwrap.wrap(what_if.recommendation(), SUMMARY_WIDTH, subsequent_indent="  "),
    ]
    return lines


# HTML report.


def _table_rows(what_if: WhatIfResult) -> list[str]:
    rows = []
    recommended = what_if.recommended
    for outcome in what_if.windows:
        name = format_duration(outcome.window_seconds)
        if outcome.main:
            name += " (main)"
        if outcome is recommended:
            name += " (recommended)"
        cells = [
            _cell(name, number=False),
            _cell(format_count(outcome.missed_clicks)),
            _cell(format_rate(outcome.missed_click_share)),
            _cell(format_count(outcome.join_late_clicks)),
            _cell(format_count(outcome.missed_after_retention)),
            _cell(format_count(outcome.negatives)),
            _cell(format_count(outcome.fake_negatives)),
            _cell(format_rate(outcome.fake_negative_share)),
            _cell(format_metric("log_loss", outcome.served.log_loss)),
            _cell(format_metric("normalized_entropy", outcome.served.normalized_entropy)),
            _cell(format_metric("calibration", outcome.served.calibration)),
            _cell(format_metric("normalized_entropy", outcome.served_final.normalized_entropy)),
            _cell(format_metric("calibration", outcome.served_final.calibration)),
        ]
        share = outcome.missed_click_share
        too_many = share is not None and share > what_if.max_missed_click_share
        row_class = ' class="worse"' if too_many else ""
        rows.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    return rows


def html_section(result: ReplayResult, directory: Path) -> str:
    """Write the label-delay CDF plot and return the what-if's HTML section, or ""."""
    what_if: WhatIfResult | None = result.what_if
    if what_if is None:
        return ""
    _plot_delay_cdf(what_if, Path(directory) / CDF_PLOT)

    headers = [
        "window",
        "missed clicks",
        "missed share",
        "late clicks (join)",
        "late clicks after retention",
        "negatives",
        "fake negatives",
        "fake-negative share",
        "log loss",
        "normalised entropy",
        "calibration",
        "NE, final labels",
        "calibration, final labels",
    ]
    verdict_class = "verdict" if what_if.recommended is not None else "verdict worse"
    maximum = format_rate(what_if.max_missed_click_share)
    table_note = (
        f"{_escape(what_if.model)} replayed once per window on the same stream, "
        f"{what_if.matched_clicks:,} clicks matched to an impression. Missed share: clicks later "
        "than the window over all matched clicks, from the stream's timestamps. Late clicks "
        "(join) is the join's own count, as a cross-check. The join counts clicks after the window "
        "plus retention plus allowed lateness as orphans, so in a stream in event-time order its "
        "count is lower by the late clicks after retention. Fake "
        "negatives: impressions labelled negative when their window closed that got a click "
        "later, over all negatives. Log loss, normalised entropy and calibration score the served "
        "scores against that window's labels. The final-label columns score the same served "
        "scores against every matched click, so the windows compare on equal labels. Calibration "
        "is predicted over observed clicks, and above 1 over-predicts. Rows in red miss more than "
        f"{maximum} of clicks."
    )
    plot_caption = (
        "The curve is the share of matched clicks that arrived within the delay on the x axis "
        "(log scale) after their impression. Each dashed line is a window: the curve's height "
        "there is the share it catches, and the rest is its missed share. The dotted horizontal "
        f"line is 1 minus the maximum missed share of {maximum}. The smallest window whose line "
        "meets the curve at or above it is the recommendation."
    )
    return (
        "<h2>Attribution-window what-if</h2>"
        f'<p class="{verdict_class}">{_escape(what_if.recommendation())}</p>'
        + _table(headers, _table_rows(what_if))
        + f'<p class="note">{table_note}</p>'
        + f'<figure><img src="{CDF_PLOT}" alt="label delay CDF with each window">'
        f"<figcaption>{_escape(plot_caption)}</figcaption></figure>"
    )


def _time_axis_range(delays: np.ndarray, windows: Sequence[float]) -> tuple[float, float]:
    positive = [float(delays[delays > 0].min())] if np.any(delays > 0) else []
    low = min([*positive, *windows]) / 2.0
    high = max([*([float(delays.max())] if delays.size else []), *windows]) * 2.0
    return low, high


def _plot_delay_cdf(what_if: WhatIfResult, path: Path) -> None:
    figure, axes = _new_figure()
    delays = what_if.delays
    axes.set_title(f"Label delay of {delays.size:,} matched clicks, with each what-if window")
    axes.set_xlabel("delay from impression to click (log scale)")
    axes.set_ylabel("share of matched clicks with delay ≤ x")
    if delays.size == 0:
        _show_message(axes, "No click matched an impression, so there are no delays to show.")
        _save(figure, path)
        return

    low, high = _time_axis_range(delays, [outcome.window_seconds for outcome in what_if.windows])
    axes.set_xscale("log")
    axes.set_xlim(low, high)
    axes.set_ylim(0.0, 1.02)
    ticks = [(seconds, label) for seconds, label in _TIME_TICKS if low <= seconds <= high]
    axes.xaxis.set_major_locator(FixedLocator([seconds for seconds, _ in ticks]))
    axes.set_xticklabels([label for _, label in ticks])
    axes.xaxis.set_minor_locator(NullLocator())

    # A delay of 0 s has no place on a log axis, so the curve starts at their share.
    zero = int(np.count_nonzero(delays <= 0))
    positive = delays[zero:]
    points = np.unique(np.linspace(0, positive.size - 1, min(positive.size, MAX_CDF_POINTS)))
    points = points.astype(np.int64)
    x = np.concatenate([[low], positive[points], [high]])
    shares = np.concatenate([[zero], zero + points + 1, [delays.size]]) / delays.size
    label = "share of clicks with delay ≤ x"
    if zero:
        label += f" ({format_rate(zero / delays.size)} at 0 s)"
    axes.step(x, shares, where="post", color="black", label=label)

    _draw_windows(axes, what_if)
    axes.legend(loc="best", fontsize="small")
    _save(figure, path)


def _draw_windows(axes: Any, what_if: WhatIfResult) -> None:
    axes.axhline(
        1.0 - what_if.max_missed_click_share,
        color="gray",
        linestyle=":",
        linewidth=1.2,
        label=f"caught share needed: {format_rate(1.0 - what_if.max_missed_click_share)}",
    )
    recommended = what_if.recommended
    colors = [f"C{index % 10}" for index in range(len(what_if.windows))]
    for outcome, color in zip(what_if.windows, colors, strict=True):
        label = (
            f"window {format_duration(outcome.window_seconds)}: misses "
            f"{format_rate(outcome.missed_click_share)}"
        )
        if outcome is recommended:
            label += " (recommended)"
        axes.axvline(
            outcome.window_seconds,
            color=color,
            linestyle="--",
            linewidth=2.5 if outcome is recommended else 1.2,
            label=label,
        )


# metrics.json.


def _window_document(outcome: WindowOutcome) -> dict[str, Any]:
    return {
        "window_seconds": outcome.window_seconds,
        "retention_seconds": outcome.retention_seconds,
        "main": outcome.main,
        "matched_clicks": outcome.matched_clicks,
        "missed_clicks": outcome.missed_clicks,
        "missed_click_share": outcome.missed_click_share,
        "join_late_clicks": outcome.join_late_clicks,
        "missed_after_retention": outcome.missed_after_retention,
        "negatives": outcome.negatives,
        "fake_negatives": outcome.fake_negatives,
        "fake_negative_share": outcome.fake_negative_share,
        "served": outcome.served.as_dict(),
        "served_final_labels": outcome.served_final.as_dict(),
    }


def document(result: ReplayResult) -> dict[str, Any] | None:
    """Return the what-if's numbers for metrics.json, or None when it did not run."""
    what_if: WhatIfResult | None = result.what_if
    if what_if is None:
        return None
    recommended = what_if.recommended
    return {
        "model": what_if.model,
        "main_window_seconds": what_if.main_window_seconds,
        "max_missed_click_share": what_if.max_missed_click_share,
        "recommended_window_seconds": None if recommended is None else recommended.window_seconds,
        "recommendation": what_if.recommendation(),
        "impressions": what_if.impressions,
        "matched_clicks": what_if.matched_clicks,
        "unmatched_clicks": what_if.unmatched_clicks,
        "clicks_before_impression": what_if.clicks_before_impression,
        "invalid_lines": what_if.invalid_lines,
        "label_delay_seconds": label_delay_quantiles(what_if.delays.tolist()),
        "windows": [_window_document(outcome) for outcome in what_if.windows],
    }
