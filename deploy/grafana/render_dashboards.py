"""Render the Grafana dashboards as PNG pictures from a real run of the local demo.

Grafana is not needed. The script starts the demo of ``online-ctr demo-local``:
Tansu, redis-server, Prometheus and the four services, all on loopback ports.
The population drifts at about half time. At the end the script sends each
panel's PromQL to that Prometheus as a ``query_range`` over the run, and draws
every dashboard as one figure with the panels laid out by their ``gridPos``::

    .venv/bin/python deploy/grafana/render_dashboards.py --out docs/images

This writes ``docs/images/dashboard-<name>.png`` for each file in
``deploy/grafana/dashboards``. ``--save-data`` keeps the query results as
JSON, and ``--from-data`` draws the pictures again from such a file without
starting the demo. Needs redis-server and prometheus on PATH, as the demo does.
With the default six-minute run, the whole command took 6 min 11 s on a
2-core machine.

The pictures imitate Grafana, but only roughly. Time series are lines and stat
panels show the last value. A heatmap target with ``format: heatmap`` turns
its cumulative ``le`` buckets into counts per bucket, as Grafana does. Dashed
threshold lines appear where a panel sets ``thresholdsStyle``, and the
dashboards' drift annotation is a dashed purple line in every graph.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import math
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.dates as mdates
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LinearSegmentedColormap
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator
from PIL import Image

REPOSITORY = Path(__file__).resolve().parents[2]
if str(REPOSITORY) not in sys.path:
    # Run as a script, Python puts only deploy/grafana on the path.
    sys.path.insert(0, str(REPOSITORY))

from shared.demo_local import DASHBOARD_DIR, DEMO_SETTINGS, DemoOptions, LocalDemo  # noqa: E402
from shared.errors import OnlineCtrError  # noqa: E402
from shared.logs import configure_logging  # noqa: E402

logger = logging.getLogger("render_dashboards")

# The demo's joiner emits a negative example only when the impression's join
# window (ONLINE_CTR_WINDOW_SECONDS, 120 s in the demo) closes, so the model
# quality panels fill from about two minutes in. Six minutes leave about four
# minutes of them, and the drift at half time falls inside that.
DEFAULT_SECONDS = 360.0
DEFAULT_RATE = 30.0
DEFAULT_STEP_S = 2.0
# The query_range resolution must not be finer than the demo's scrape interval.
MIN_STEP_S = 2.0
# The demo needs about a minute before the first model is served, so a
# shorter run leaves the model and drift panels mostly empty.
MIN_SECONDS = 60.0
QUERY_TIMEOUT_S = 30.0
SECONDS_PER_DAY = 86_400.0

# Grafana's built-in variables, replaced before a query goes to Prometheus.
# Grafana sets $__rate_interval to max($__interval + scrape interval, 4 x scrape
# interval), which is 8 s at the demo's 2 s. A fixed minute smooths the lines more.
RATE_INTERVAL = "1m"
ALL_VALUES_REGEX = ".*"

# Size of one grid cell of Grafana's 24-column layout. Grafana draws a row unit
# 30 px high plus an 8 px gap (GRID_CELL_HEIGHT and GRID_CELL_VMARGIN in its
# public/app/core/constants.ts), about half a column on a 1900 px wide screen.
GRID_COLUMNS = 24
COLUMN_WIDTH_IN = 0.75
ROW_UNIT_HEIGHT_IN = 0.36
PAGE_MARGIN_IN = 0.3
HEADER_HEIGHT_IN = 1.15
PANEL_GAP_IN = 0.07
DPI = 100

# Inside a panel box, in inches: the title strip and the room for tick labels.
PANEL_TITLE_HEIGHT_IN = 0.32
AXES_LEFT_IN = 0.72
AXES_RIGHT_IN = 0.18
AXES_BOTTOM_IN = 0.32
LEGEND_INSET_IN = 0.08
STAT_MIN_FONT_SIZE = 14.0
STAT_MAX_FONT_SIZE = 34.0
LEGEND_MAX_SHARE = 0.42
LEGEND_MAX_COLUMNS = 8
LEGEND_FONT_SIZES = (8.0, 7.0)
LEGEND_LINE_SPACING = 1.45
POINTS_PER_INCH = 72.0

# Grafana's dark theme and its classic palette.
THEME = {
    "page": "#111217",
    "panel": "#181b1f",
    "border": "#2c3235",
    "grid": "#2c3235",
    "text": "#ccccdc",
    "muted": "#8e8e9a",
}
PALETTE = (
    "#73bf69",
    "#f2cc0c",
    "#8ab8ff",
    "#ff780a",
    "#f2495c",
    "#5794f2",
    "#b877d9",
    "#705da0",
    "#37872d",
    "#fade2a",
    "#447ebc",
    "#c15c17",
    "#890f02",
    "#0a437c",
    "#6d1f62",
    "#584477",
)
NAMED_COLORS = {
    "green": "#73bf69",
    "red": "#f2495c",
    "orange": "#ff9830",
    "yellow": "#fade2a",
    "blue": "#5794f2",
    "purple": "#b877d9",
    "text": THEME["text"],
}
ANNOTATION_COLOR = NAMED_COLORS["purple"]
# Grafana's "Oranges" scheme on the dark theme runs from dark to bright.
HEATMAP_COLORMAP = LinearSegmentedColormap.from_list(
    "grafana-dark-oranges", ["#4a2106", "#ff780a", "#ffd9a8"]
)

# Y-axis labels of Grafana's unit ids; "short" and "none" get no label.
UNIT_LABELS = {
    "reqps": "req/s",
    "ops": "ops/s",
    "s": "seconds",
    "ms": "milliseconds",
    "percentunit": "percent",
    "percent": "percent",
    "bytes": "bytes",
}
# (largest value below, seconds per axis unit, axis label) for duration axes.
DURATION_AXIS_SCALES = (
    (1.0, 1e-3, "milliseconds"),
    (300.0, 1.0, "seconds"),
    (5 * 3600.0, 60.0, "minutes"),
    (math.inf, 3600.0, "hours"),
)
LEGEND_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
# Grafana variables as $name, ${name} or ${name:format}.
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
# Agg writes "Software: matplotlib version ..." into each PNG unless this metadata removes it.
PNG_METADATA = {"Software": None}
PNG_COLORS = 256


@dataclass(frozen=True)
class TimeRange:
    """The span of the run that the queries cover, in Unix seconds, and their step."""

    start: float
    end: float
    step: float

    def grid(self) -> np.ndarray:
        """Return the evaluation times of a query_range over this span."""
        count = int(math.floor((self.end - self.start) / self.step)) + 1
        return self.start + self.step * np.arange(count)


class PrometheusClient:
    """The part of the Prometheus HTTP API the renderer uses, over urllib."""

    def __init__(self, base_url: str, timeout_s: float = QUERY_TIMEOUT_S) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def query_range(self, expr: str, span: TimeRange) -> list[dict[str, Any]]:
        """Evaluate ``expr`` over ``span`` and return ``data.result``: one matrix series each.

        Raises ValueError with Prometheus's message if it rejects the expression.
        """
        parameters = {
            "query": expr,
            "start": f"{span.start:.3f}",
            "end": f"{span.end:.3f}",
            "step": f"{span.step:g}",
        }
        url = f"{self.base_url}/api/v1/query_range?{urllib.parse.urlencode(parameters)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            # Prometheus returns 400 and a JSON error body for an invalid expression.
            detail = error.read().decode("utf-8", errors="replace")
            raise ValueError(
                f"Prometheus rejected {expr!r} with HTTP {error.code}: {detail}"
            ) from error
        if body.get("status") != "success":
            raise ValueError(f"Prometheus query {expr!r} failed: {body.get('error', body)}")
        return body["data"]["result"]


def iter_panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Yield every panel, the ones nested in collapsed rows included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def load_dashboards(directory: Path = DASHBOARD_DIR) -> dict[str, dict[str, Any]]:
    """Return ``{name: dashboard model}`` for each ``<name>.json`` in ``directory``."""
    dashboards = {
        path.stem: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(directory.glob("*.json"))
    }
    if not dashboards:
        raise FileNotFoundError(f"no dashboard JSON files found in {directory}")
    return dashboards


def panel_key(panel: Mapping[str, Any]) -> str:
    """Return the key of a panel's results: its id, or its title when it has none."""
    return str(panel.get("id", panel.get("title", "")))


def variable_values(dashboard: Mapping[str, Any], span: TimeRange) -> dict[str, str]:
    """Return the value of each Grafana variable that a query of ``dashboard`` may use.

    A template variable takes its saved current value, and "All" or a multi-value
    selection becomes a regular expression that matches the selected values.
    """
    duration_s = span.end - span.start
    values = {
        "__rate_interval": RATE_INTERVAL,
        "__interval": f"{span.step:g}s",
        "__interval_ms": f"{span.step * 1000:.0f}",
        "__range": f"{duration_s:.0f}s",
        "__range_s": f"{duration_s:.0f}",
        "__range_ms": f"{duration_s * 1000:.0f}",
    }
    for variable in dashboard.get("templating", {}).get("list", []):
        current = variable.get("current", {}).get("value")
        if current is None and variable.get("options"):
            current = variable["options"][0].get("value")
        if isinstance(current, list):
            if "$__all" in current:
                current = ALL_VALUES_REGEX
            else:
                current = "|".join(re.escape(str(value)) for value in current)
        if current == "$__all":
            current = variable.get("allValue") or ALL_VALUES_REGEX
        values[variable["name"]] = "" if current is None else str(current)
    return values


def substitute_variables(expr: str, values: Mapping[str, str]) -> str:
    """Replace Grafana variables in ``expr``; unknown variables stay as they are."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return VARIABLE.sub(replace, expr)


def collect_results(
    client: PrometheusClient,
    dashboards: Mapping[str, Mapping[str, Any]],
    span: TimeRange,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Run every panel target over ``span``; return ``{dashboard: {panel key: [target]}}``.

    Each target is its refId, legend format, the expression as sent and the
    raw Prometheus series. A rejected expression is logged and kept with an
    ``error`` field, so the other panels still render.
    """
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name, dashboard in dashboards.items():
        values = variable_values(dashboard, span)
        panels: dict[str, list[dict[str, Any]]] = {}
        for panel in iter_panels(dashboard.get("panels", [])):
            targets = [target for target in panel.get("targets", []) if target.get("expr")]
            if not targets:
                continue
            collected = []
            for target in targets:
                expr = substitute_variables(target["expr"], values)
                entry: dict[str, Any] = {
                    "refId": target.get("refId", ""),
                    "legendFormat": target.get("legendFormat", ""),
                    "format": target.get("format", "time_series"),
                    "expr": expr,
                    "series": [],
                }
                try:
                    entry["series"] = client.query_range(expr, span)
                except ValueError as error:
                    logger.error(
                        "%s / %s / %s: %s", name, panel.get("title"), entry["refId"], error
                    )
                    entry["error"] = str(error)
                collected.append(entry)
            panels[panel_key(panel)] = collected
        results[name] = panels
    return results


def annotation_times(
    client: PrometheusClient, dashboards: Mapping[str, Mapping[str, Any]], span: TimeRange
) -> list[float]:
    """Return the start of each region where a dashboard annotation's expression has values.

    The dashboards share one annotation, the simulator's drift switch, so the
    times of all dashboards are merged.
    """
    starts: set[float] = set()
    for dashboard in dashboards.values():
        for annotation in dashboard.get("annotations", {}).get("list", []):
            expr = annotation.get("expr")
            if not expr or not annotation.get("enable", True):
                continue
            try:
                series_list = client.query_range(expr, span)
            except ValueError as error:
                logger.error("annotation %r: %s", annotation.get("name"), error)
                continue
            for series in series_list:
                times = [float(timestamp) for timestamp, _ in series["values"]]
                previous = None
                for timestamp in times:
                    if previous is None or timestamp - previous > span.step * 1.5:
                        starts.add(timestamp)
                    previous = timestamp
    return sorted(starts)


@dataclass(frozen=True)
class RunInfo:
    """Details of the demo run behind the data, for the figure headers."""

    span: TimeRange
    impressions_per_second: float
    drift_after_seconds: float | None
    drift_times: tuple[float, ...]


@dataclass(frozen=True)
class Line:
    """One series of a panel, ready to draw."""

    label: str
    values: np.ndarray


@dataclass(frozen=True)
class Box:
    """A rectangle of the figure in inches from the bottom left corner."""

    left: float
    bottom: float
    width: float
    height: float

    @property
    def top(self) -> float:
        """The y coordinate of the upper edge."""
        return self.bottom + self.height


class DashboardFigure:
    """One dashboard drawn as a matplotlib figure, with its panels placed by ``gridPos``."""

    def __init__(self, dashboard: Mapping[str, Any], run: RunInfo) -> None:
        self.dashboard = dashboard
        self.run = run
        self.panels = list(iter_panels(dashboard.get("panels", [])))
        grid_rows = max((_grid(panel)["y"] + _grid(panel)["h"] for panel in self.panels), default=1)
        self.width_in = 2 * PAGE_MARGIN_IN + GRID_COLUMNS * COLUMN_WIDTH_IN
        self.height_in = HEADER_HEIGHT_IN + grid_rows * ROW_UNIT_HEIGHT_IN + PAGE_MARGIN_IN
        self.figure = Figure(figsize=(self.width_in, self.height_in), dpi=DPI)
        self.figure.set_facecolor(THEME["page"])
        # The Agg canvas, and not pyplot, so no display is needed and legends can be measured.
        FigureCanvasAgg(self.figure)
        self.times = run.span.grid().astype("datetime64[s]")

    def draw(self, panel_results: Mapping[str, list[dict[str, Any]]]) -> Figure:
        """Draw the header and every panel; return the figure."""
        self._draw_header()
        for panel in self.panels:
            box = self._panel_box(panel)
            if panel.get("type") == "row":
                self._text(
                    box.left,
                    box.bottom + box.height / 2,
                    panel.get("title", ""),
                    size=12,
                    weight="bold",
                    va="center",
                )
                continue
            self._draw_frame(box, panel.get("title", ""))
            targets = panel_results.get(panel_key(panel))
            if targets is None:
                continue
            kind = panel.get("type")
            if kind == "stat":
                self._draw_stat(box, panel, targets)
            elif kind == "heatmap":
                self._draw_heatmap(box, panel, targets)
            else:
                self._draw_timeseries(box, panel, targets)
        return self.figure

    # Geometry and plain text.

    def _panel_box(self, panel: Mapping[str, Any]) -> Box:
        grid = _grid(panel)
        left = PAGE_MARGIN_IN + grid["x"] * COLUMN_WIDTH_IN + PANEL_GAP_IN
        top = self.height_in - HEADER_HEIGHT_IN - grid["y"] * ROW_UNIT_HEIGHT_IN - PANEL_GAP_IN
        width = grid["w"] * COLUMN_WIDTH_IN - 2 * PANEL_GAP_IN
        height = grid["h"] * ROW_UNIT_HEIGHT_IN - 2 * PANEL_GAP_IN
        return Box(left, top - height, width, height)

    def _fraction(self, box: Box) -> list[float]:
        """Return ``box`` as [left, bottom, width, height] in figure fractions."""
        return [
            box.left / self.width_in,
            box.bottom / self.height_in,
            box.width / self.width_in,
            box.height / self.height_in,
        ]

    def _text(self, x_in: float, y_in: float, text: str, **style: Any) -> Any:
        style.setdefault("color", THEME["text"])
        return self.figure.text(
            x_in / self.width_in, y_in / self.height_in, text, parse_math=False, **style
        )

    def _draw_header(self) -> None:
        span = self.run.span
        start = _utc(span.start)
        end = _utc(span.end)
        top = self.height_in - PAGE_MARGIN_IN
        self._text(
            PAGE_MARGIN_IN, top, self.dashboard.get("title", ""), size=20, weight="bold", va="top"
        )
        self._text(
            PAGE_MARGIN_IN,
            top - 0.38,
            f"rendered from Prometheus data of `make demo-local`, {end:%Y-%m-%d} UTC",
            size=12,
            va="top",
        )
        details = [
            f"run {start:%H:%M:%S} to {end:%H:%M:%S} UTC",
            f"{self.run.impressions_per_second:g} impressions/s",
            f"query step {span.step:g} s, $__rate_interval = {RATE_INTERVAL}",
        ]
        if self.run.drift_times:
            drift = ", ".join(f"{_utc(when):%H:%M:%S}" for when in self.run.drift_times)
            details.append(f"population drift at {drift} (dashed purple line)")
        elif self.run.drift_after_seconds is not None:
            details.append("no population drift recorded in this run")
        self._text(
            PAGE_MARGIN_IN,
            top - 0.64,
            "   |   ".join(details),
            size=9.5,
            va="top",
            color=THEME["muted"],
        )

    def _draw_frame(self, box: Box, title: str) -> None:
        background = Rectangle(
            (box.left / self.width_in, box.bottom / self.height_in),
            box.width / self.width_in,
            box.height / self.height_in,
            transform=self.figure.transFigure,
            facecolor=THEME["panel"],
            edgecolor=THEME["border"],
            linewidth=0.8,
            zorder=-10,
        )
        self.figure.patches.append(background)
        self._text(box.left + 0.1, box.top - 0.08, title, size=10.5, weight="bold", va="top")

    def _draw_no_data(self, box: Box, message: str = "no data in this run") -> None:
        self._text(
            box.left + box.width / 2,
            box.bottom + (box.height - PANEL_TITLE_HEIGHT_IN) / 2,
            message,
            size=11,
            ha="center",
            va="center",
            color=THEME["muted"],
        )

    def _content_box(self, box: Box) -> Box:
        return Box(box.left, box.bottom, box.width, box.height - PANEL_TITLE_HEIGHT_IN)

    # Time series.

    def _draw_timeseries(
        self, box: Box, panel: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        lines = self._lines(targets)
        if not lines:
            self._draw_no_data(box, _no_data_message(targets))
            return
        content = self._content_box(box)
        colors = [PALETTE[index % len(PALETTE)] for index in range(len(lines))]
        handles = [Line2D([], [], color=color, linewidth=2) for color in colors]
        legend_height = self._draw_legend(content, handles, [line.label for line in lines])

        axes_bottom = content.bottom + legend_height + AXES_BOTTOM_IN
        axes_box = Box(
            content.left + AXES_LEFT_IN,
            axes_bottom,
            content.width - AXES_LEFT_IN - AXES_RIGHT_IN,
            content.top - axes_bottom - 0.06,
        )
        axes = self.figure.add_axes(self._fraction(axes_box))
        _style_axes(axes)
        for line, color in zip(lines, colors, strict=True):
            axes.plot(self.times, line.values, color=color, linewidth=1.3)
        self._format_time_axis(axes)
        unit = _unit(panel)
        _format_value_axis(axes, unit)
        self._draw_thresholds(axes, panel)
        self._draw_annotations(axes)

    def _lines(self, targets: Sequence[Mapping[str, Any]]) -> list[Line]:
        lines = []
        for target in targets:
            target_lines = []
            for series in target.get("series", []):
                values = _aligned_values(series["values"], self.run.span)
                if np.all(np.isnan(values)):
                    continue
                label = legend_label(
                    target.get("legendFormat", ""), series["metric"], target["expr"]
                )
                target_lines.append(Line(label, values))
            lines += sorted(target_lines, key=lambda line: _natural_key(line.label))
        return lines

    def _draw_legend(self, content: Box, handles: list[Line2D], labels: list[str]) -> float:
        """Draw the legend at the bottom of ``content``, as wide as fits; return its height."""
        renderer = self.figure.canvas.get_renderer()
        max_width = content.width - 2 * LEGEND_INSET_IN
        max_height = content.height * LEGEND_MAX_SHARE

        # Try the most columns that fit the width, at the normal and then the small font.
        for font_size in LEGEND_FONT_SIZES:
            for columns in range(min(len(labels), LEGEND_MAX_COLUMNS), 0, -1):
                legend = self._add_legend(content, handles, labels, columns, font_size)
                extent = legend.get_window_extent(renderer)
                if extent.width / DPI <= max_width or columns == 1:
                    break
                legend.remove()
            height = legend.get_window_extent(renderer).height / DPI
            if height <= max_height:
                return height + 2 * LEGEND_INSET_IN
            legend.remove()

        # Still too tall at the small font: list the first series and count the rest.
        font_size = LEGEND_FONT_SIZES[-1]
        rows = max(1, int(max_height / (font_size * LEGEND_LINE_SPACING / POINTS_PER_INCH)))
        columns = max(1, int(max_width / _legend_column_width(labels, font_size)))
        kept = max(1, rows * columns - 1)
        placeholder = Line2D([], [], linestyle="none")
        legend = self._add_legend(
            content,
            handles[:kept] + [placeholder],
            labels[:kept] + [f"and {len(labels) - kept} more series"],
            columns,
            font_size,
        )
        return legend.get_window_extent(renderer).height / DPI + 2 * LEGEND_INSET_IN

    def _add_legend(
        self,
        content: Box,
        handles: Sequence[Line2D],
        labels: Sequence[str],
        columns: int,
        font_size: float,
    ) -> Any:
        anchor = (
            (content.left + LEGEND_INSET_IN) / self.width_in,
            (content.bottom + LEGEND_INSET_IN / 2) / self.height_in,
        )
        return self.figure.legend(
            handles,
            labels,
            loc="lower left",
            bbox_to_anchor=anchor,
            bbox_transform=self.figure.transFigure,
            ncols=columns,
            fontsize=font_size,
            frameon=False,
            labelcolor=THEME["text"],
            handlelength=1.2,
            handletextpad=0.4,
            columnspacing=1.2,
            borderaxespad=0,
            borderpad=0,
        )

    def _format_time_axis(self, axes: Axes) -> None:
        span = self.run.span
        axes.set_xlim(np.datetime64(int(span.start), "s"), np.datetime64(int(span.end), "s"))
        locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
        axes.xaxis.set_major_locator(locator)
        axes.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))

    def _draw_thresholds(self, axes: Axes, panel: Mapping[str, Any]) -> None:
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        style = defaults.get("custom", {}).get("thresholdsStyle", {}).get("mode", "off")
        if style == "off":
            return
        low, high = axes.get_ylim()
        # Like Grafana, a threshold outside the data's range does not stretch the axis.
        axes.set_autoscaley_on(False)
        for step in defaults.get("thresholds", {}).get("steps", []):
            value = step.get("value")
            if value is None or not low <= value <= high:
                continue
            axes.axhline(
                value,
                color=_color(step.get("color")),
                linewidth=1,
                linestyle="--" if "dashed" in style else "-",
                alpha=0.8,
            )

    def _draw_annotations(self, axes: Axes) -> None:
        for when in self.run.drift_times:
            axes.axvline(
                np.datetime64(int(when), "s"),
                color=ANNOTATION_COLOR,
                linewidth=1.2,
                linestyle="--",
                alpha=0.9,
            )

    # Heatmap.

    def _draw_heatmap(
        self, box: Box, panel: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        buckets = _bucket_counts(
            [series for target in targets for series in target["series"]], self.run.span
        )
        if buckets is None:
            self._draw_no_data(box, _no_data_message(targets))
            return
        bounds, counts = buckets
        content = self._content_box(box)
        colorbar_width = 0.12
        axes_box = Box(
            content.left + AXES_LEFT_IN,
            content.bottom + AXES_BOTTOM_IN + 0.04,
            content.width - AXES_LEFT_IN - AXES_RIGHT_IN - 0.75,
            content.height - AXES_BOTTOM_IN - 0.1,
        )
        axes = self.figure.add_axes(self._fraction(axes_box))
        _style_axes(axes)
        step = self.run.span.step
        edges = (self.run.span.grid() - step / 2).tolist() + [self.run.span.grid()[-1] + step / 2]
        x_edges = np.array([np.datetime64(int(round(edge * 1000)), "ms") for edge in edges])
        y_edges = np.arange(len(bounds) + 1)
        # Grafana leaves cells of zero or less empty.
        masked = np.ma.masked_less_equal(np.nan_to_num(counts, nan=0.0), 0.0)
        mesh = axes.pcolormesh(x_edges, y_edges, masked, cmap=HEATMAP_COLORMAP, shading="flat")
        self._format_time_axis(axes)

        # Each row is one bucket, labelled with its upper bound at its top edge.
        every = max(1, math.ceil(len(bounds) / 8))
        ticks = list(range(1, len(bounds) + 1, every))
        axes.set_yticks(ticks)
        unit = panel.get("options", {}).get("yAxis", {}).get("unit") or _unit(panel)
        axes.set_yticklabels([_format_bound(bounds[tick - 1], unit) for tick in ticks])
        axes.set_ylabel("bucket upper bound", color=THEME["muted"], fontsize=8)
        self._draw_annotations(axes)

        colorbar_box = Box(
            axes_box.left + axes_box.width + 0.12, axes_box.bottom, colorbar_width, axes_box.height
        )
        colorbar_axes = self.figure.add_axes(self._fraction(colorbar_box))
        colorbar = self.figure.colorbar(mesh, cax=colorbar_axes)
        colorbar.outline.set_edgecolor(THEME["border"])
        colorbar_axes.tick_params(colors=THEME["muted"], labelsize=7)
        colorbar_axes.yaxis.set_major_locator(MaxNLocator(5, integer=True))
        colorbar.set_label("count", color=THEME["muted"], fontsize=7)

    # Stat.

    def _draw_stat(
        self, box: Box, panel: Mapping[str, Any], targets: Sequence[Mapping[str, Any]]
    ) -> None:
        """Draw the last value of each series side by side, coloured by the panel's thresholds."""
        lines = self._lines(targets)
        if not lines:
            self._draw_no_data(box, _no_data_message(targets))
            return
        defaults = panel.get("fieldConfig", {}).get("defaults", {})
        unit = _unit(panel)
        decimals = defaults.get("decimals")
        steps = defaults.get("thresholds", {}).get("steps", [])
        # NOTE: no dashboard sets graphMode "area" yet, so the sparkline has not been looked at.
        graph = panel.get("options", {}).get("graphMode", "none") == "area"

        content = self._content_box(box)
        slot_width = content.width / len(lines)
        # Scale the font to the longest value text, so that values do not run into each other.
        longest = max(6, _longest_value(lines, unit, decimals))
        value_size = min(STAT_MAX_FONT_SIZE, max(STAT_MIN_FONT_SIZE, 150.0 * slot_width / longest))
        center_y = content.bottom + content.height * (0.62 if graph else 0.52)

        for index, line in enumerate(lines):
            last = float(line.values[~np.isnan(line.values)][-1])
            color = _threshold_color(last, steps)
            center_x = content.left + slot_width * (index + 0.5)
            self._text(
                center_x,
                center_y,
                format_value(last, unit, decimals),
                size=value_size,
                weight="bold",
                ha="center",
                va="center",
                color=color,
            )
            if len(lines) > 1:
                self._text(
                    center_x,
                    center_y - 0.9 * value_size / POINTS_PER_INCH,
                    line.label,
                    size=10,
                    ha="center",
                    va="top",
                    color=THEME["muted"],
                )
            if graph:
                spark = Box(
                    content.left + slot_width * index + 0.1,
                    content.bottom + 0.05,
                    slot_width - 0.2,
                    content.height * 0.3,
                )
                axes = self.figure.add_axes(self._fraction(spark))
                axes.set_axis_off()
                axes.plot(self.times, line.values, color=color, linewidth=1)

        self._text(
            content.left + content.width - 0.1,
            content.bottom + 0.08,
            "last value of the run",
            size=7,
            ha="right",
            va="bottom",
            color=THEME["muted"],
        )


def _grid(panel: Mapping[str, Any]) -> dict[str, int]:
    grid = panel.get("gridPos", {})
    return {
        key: int(grid.get(key, default))
        for key, default in (("x", 0), ("y", 0), ("w", 12), ("h", 8))
    }


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC)


def _unit(panel: Mapping[str, Any]) -> str:
    return panel.get("fieldConfig", {}).get("defaults", {}).get("unit") or "short"


def _color(name: str | None) -> str:
    if not name:
        return NAMED_COLORS["green"]
    return NAMED_COLORS.get(name, name)


def _threshold_color(value: float, steps: Sequence[Mapping[str, Any]]) -> str:
    """Return the colour of the highest threshold step at or below ``value``, as Grafana does."""
    color = NAMED_COLORS["text"]
    for step in steps:
        if step.get("value") is None or value >= step["value"]:
            color = _color(step.get("color"))
    return color


def _style_axes(axes: Axes) -> None:
    axes.set_facecolor(THEME["panel"])
    for spine in axes.spines.values():
        spine.set_color(THEME["border"])
    axes.tick_params(colors=THEME["muted"], labelsize=8, length=3)
    axes.grid(True, color=THEME["grid"], linewidth=0.6)
    axes.set_axisbelow(True)


def _format_value_axis(axes: Axes, unit: str) -> None:
    """Label the y axis with the unit, and scale durations to ms, s, min or hours."""
    axes.yaxis.set_major_locator(MaxNLocator(5))
    factor = 1.0
    label = UNIT_LABELS.get(unit)
    if unit == "percentunit":
        factor = 100.0
    elif unit in ("s", "ms"):
        unit_seconds = 1.0 if unit == "s" else 1e-3
        largest = max(abs(limit) for limit in axes.get_ylim()) * unit_seconds
        scale, label = next(
            (scale, name) for limit, scale, name in DURATION_AXIS_SCALES if largest < limit
        )
        factor = unit_seconds / scale
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value * factor:.4g}"))
    if label:
        axes.set_ylabel(label, color=THEME["muted"], fontsize=8)


def _no_data_message(targets: Sequence[Mapping[str, Any]]) -> str:
    if any("error" in target for target in targets):
        return "query failed in this run (see the log)"
    return "no data in this run"


def _aligned_values(pairs: Sequence[Sequence[Any]], span: TimeRange) -> np.ndarray:
    """Return the series' values on the query grid, NaN where Prometheus returned none."""
    values = np.full(len(span.grid()), np.nan)
    for timestamp, text in pairs:
        index = int(round((float(timestamp) - span.start) / span.step))
        if 0 <= index < len(values):
            value = float(text)
            values[index] = value if math.isfinite(value) else np.nan
    return values


def _bucket_counts(
    series_list: Sequence[Mapping[str, Any]], span: TimeRange
) -> tuple[list[float], np.ndarray] | None:
    """Turn cumulative ``le`` series into counts per bucket, rows sorted by upper bound.

    Returns None when no series has a finite value.
    """
    rows = []
    for series in series_list:
        bound = series["metric"].get("le")
        if bound is None:
            continue
        values = _aligned_values(series["values"], span)
        if not np.all(np.isnan(values)):
            rows.append((float(bound), values))
    if not rows:
        return None
    rows.sort(key=lambda row: row[0])
    cumulative = np.vstack([values for _, values in rows])
    counts = np.diff(cumulative, axis=0, prepend=np.zeros((1, cumulative.shape[1])))
    # increase() extrapolates each series on its own, so a bucket can come out
    # slightly below the one under it.
    counts = np.clip(counts, 0.0, None)
    return [bound for bound, _ in rows], counts


def _format_bound(bound: float, unit: str) -> str:
    if math.isinf(bound):
        return "+Inf"
    return format_value(bound, unit, None)


def _natural_key(label: str) -> list[Any]:
    """Sort key that puts "p2" before "p10"."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", label)]


def _legend_column_width(labels: Sequence[str], font_size: float) -> float:
    """Estimate the width in inches of one legend column: 0.55 em per character plus the key."""
    longest = max(len(label) for label in labels)
    return (longest * 0.55 + 3.5) * font_size / POINTS_PER_INCH


def _longest_value(lines: Sequence[Line], unit: str, decimals: int | None) -> int:
    texts = []
    for line in lines:
        finite = line.values[~np.isnan(line.values)]
        texts.append(format_value(float(finite[-1]), unit, decimals))
    return max(len(text) for text in texts)


def legend_label(legend_format: str, labels: Mapping[str, str], expr: str) -> str:
    """Return a series' legend as Grafana makes it from ``legendFormat`` and the labels."""
    if legend_format and legend_format != "__auto":
        text = LEGEND_TEMPLATE.sub(lambda match: labels.get(match.group(1), ""), legend_format)
        return " ".join(text.split())
    name = labels.get("__name__", "")
    others = ", ".join(
        f'{key}="{value}"' for key, value in sorted(labels.items()) if key != "__name__"
    )
    if others:
        return f"{name}{{{others}}}"
    return name or expr


def format_value(value: float, unit: str, decimals: int | None) -> str:
    """Format a value with its unit roughly as Grafana's unit ``unit`` does."""
    if unit == "percentunit":
        return f"{_number(value * 100, decimals)}%"
    if unit == "percent":
        return f"{_number(value, decimals)}%"
    if unit == "s":
        return _duration(value, decimals)
    if unit == "ms":
        return _duration(value / 1000, decimals)
    if unit in ("reqps", "ops"):
        return f"{_number(value, decimals)} {UNIT_LABELS[unit]}"
    for scale, suffix in ((1e9, " B"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{_number(value / scale, decimals)}{suffix}"
    return _number(value, decimals)


def _duration(seconds: float, decimals: int | None) -> str:
    magnitude = abs(seconds)
    if magnitude == 0:
        return f"{_number(0.0, decimals)} s"
    for limit, scale, unit in (
        (1e-3, 1e-6, "µs"),
        (1.0, 1e-3, "ms"),
        (60.0, 1.0, "s"),
        (3600.0, 60.0, "min"),
        (SECONDS_PER_DAY, 3600.0, "hour"),
    ):
        if magnitude < limit:
            return f"{_number(seconds / scale, decimals)} {unit}"
    return f"{_number(seconds / SECONDS_PER_DAY, decimals)} day"


def _number(value: float, decimals: int | None) -> str:
    if decimals is None:
        # Two decimals below 10, one below 100, and none for larger or whole numbers.
        magnitude = abs(value)
        if magnitude >= 100 or value == int(value):
            decimals = 0
        elif magnitude >= 10:
            decimals = 1
        else:
            decimals = 2
    return f"{value:.{decimals}f}"


def render_dashboards(
    dashboards: Mapping[str, Mapping[str, Any]],
    results: Mapping[str, Mapping[str, list[dict[str, Any]]]],
    run: RunInfo,
    out_dir: Path,
) -> list[Path]:
    """Write ``dashboard-<name>.png`` into ``out_dir`` for each dashboard; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, dashboard in dashboards.items():
        figure = DashboardFigure(dashboard, run).draw(results.get(name, {}))
        path = out_dir / f"dashboard-{name}.png"
        _save_png(figure, path)
        logger.info("wrote %s (%d KB)", path, path.stat().st_size // 1024)
        paths.append(path)
    return paths


def _save_png(figure: Figure, path: Path) -> None:
    """Save ``figure`` as a PNG with a 256-colour palette.

    The flat dark theme has few colours, so the palette loses nothing visible,
    and the files came out at about a third of the full-colour size.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor=figure.get_facecolor(), metadata=PNG_METADATA)
    buffer.seek(0)
    with Image.open(buffer) as image:
        palette_image = image.convert("RGB").quantize(
            colors=PNG_COLORS, method=Image.Quantize.FASTOCTREE
        )
    palette_image.save(path, format="PNG", optimize=True)


class DemoFailedError(RuntimeError):
    """A service of the demo exited before the run was over."""


def run_demo_and_query(
    dashboards: Mapping[str, Mapping[str, Any]],
    *,
    seconds: float,
    rate: float,
    drift_after_seconds: float | None,
    step: float,
    directory: Path,
) -> tuple[dict[str, dict[str, list[dict[str, Any]]]], RunInfo]:
    """Run the local demo for ``seconds``, query every panel, stop the demo; return the data.

    Ctrl-C or SIGTERM during the run ends it early, and the data so far is kept.
    Raises DemoFailedError if a service exits before the end.
    """
    options = DemoOptions(
        impressions_per_second=rate,
        drift_after_seconds=drift_after_seconds,
        duration_seconds=seconds,
        directory=directory,
        scrape_interval_s=MIN_STEP_S,
    )
    demo = LocalDemo(options)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s; ending the run early", signal.Signals(signum).name)
        stop.set()

    began = time.time()
    try:
        demo.start()
        assert demo.prometheus is not None
        logger.info(
            "demo is running (Prometheus %s, logs in %s); waiting %.0f s",
            demo.prometheus.url,
            directory,
            seconds,
        )
        previous = {
            sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            exit_code = demo.wait(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if exit_code != 0:
            raise DemoFailedError(
                f"a demo service exited before the run ended; its log is in {directory}"
            )

        client = PrometheusClient(demo.prometheus.url)
        span = _run_span(client, began, time.time(), step)
        logger.info("querying %.0f s of data at a %g s step", span.end - span.start, step)
        results = collect_results(client, dashboards, span)
        drift_times = annotation_times(client, dashboards, span)
    finally:
        demo.stop()
    run = RunInfo(span, rate, drift_after_seconds, tuple(drift_times))
    return results, run


def _run_span(client: PrometheusClient, began: float, ended: float, step: float) -> TimeRange:
    """Return the span from Prometheus's first scrape to ``ended``, on a ``step`` grid."""
    first = client.query_range("count(up)", TimeRange(began, ended, step))
    start = min(
        (float(series["values"][0][0]) for series in first if series["values"]), default=began
    )
    count = int((ended - start) // step)
    return TimeRange(start, start + count * step, step)


def save_data(path: Path, results: Mapping[str, Any], run: RunInfo) -> None:
    """Write the query results and the run's details as JSON, for ``--from-data``."""
    data = {
        "span": {"start": run.span.start, "end": run.span.end, "step": run.span.step},
        "impressions_per_second": run.impressions_per_second,
        "drift_after_seconds": run.drift_after_seconds,
        "drift_times": list(run.drift_times),
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) + "\n", encoding="utf-8")
    logger.info("wrote the query results to %s", path)


def load_data(path: Path) -> tuple[dict[str, Any], RunInfo]:
    """Read a file that ``save_data`` wrote; return the query results and the run's details."""
    data = json.loads(path.read_text(encoding="utf-8"))
    span = TimeRange(**data["span"])
    run = RunInfo(
        span,
        data["impressions_per_second"],
        data["drift_after_seconds"],
        tuple(data["drift_times"]),
    )
    return data["results"], run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Run the local demo (as `make demo-local` does), query Prometheus for every "
        "panel of deploy/grafana/dashboards/*.json over the run, and draw each dashboard as "
        "dashboard-<name>.png. Needs redis-server and prometheus on PATH.",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for the PNG files, e.g. docs/images"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=DEFAULT_SECONDS,
        help=f"how long the demo runs before the queries, in seconds "
        f"(default: {DEFAULT_SECONDS:g}, at least {MIN_SECONDS:g})",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=DEFAULT_RATE,
        help=f"impressions per second the simulator sends (default: {DEFAULT_RATE:g})",
    )
    parser.add_argument(
        "--drift-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds after the simulator starts at which the population drifts "
        "(default: half of --seconds)",
    )
    parser.add_argument(
        "--no-drift", action="store_true", help="keep the population's behaviour unchanged"
    )
    parser.add_argument(
        "--step",
        type=float,
        default=DEFAULT_STEP_S,
        help=f"query_range resolution in seconds (default: {DEFAULT_STEP_S:g}, "
        f"at least the demo's scrape interval of {MIN_STEP_S:g})",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="directory for the demo's logs and data, kept afterwards "
        "(default: a temporary directory, removed after a successful run)",
    )
    parser.add_argument(
        "--save-data",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the query results to this JSON file",
    )
    parser.add_argument(
        "--from-data",
        type=Path,
        default=None,
        metavar="FILE",
        help="draw from a file that --save-data wrote, without running the demo",
    )
    args = parser.parse_args(argv)
    if args.seconds < MIN_SECONDS:
        parser.error(f"invalid --seconds {args.seconds:g}: it must be at least {MIN_SECONDS:g}")
    if args.rate <= 0:
        parser.error(f"invalid --rate {args.rate:g}: it must be more than 0")
    if args.step < MIN_STEP_S:
        parser.error(f"invalid --step {args.step:g}: it must be at least {MIN_STEP_S:g}")
    if args.drift_after is not None and args.drift_after <= 0:
        parser.error(f"invalid --drift-after {args.drift_after:g}: it must be more than 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    args = parse_args(argv)
    configure_logging()
    dashboards = load_dashboards()

    if args.from_data is not None:
        results, run = load_data(args.from_data)
        render_dashboards(dashboards, results, run, args.out)
        return 0

    window_s = float(DEMO_SETTINGS["ONLINE_CTR_WINDOW_SECONDS"])
    if args.seconds < window_s + 60:
        logger.warning(
            "a run of %g s leaves the model quality panels nearly empty, because the joiner "
            "emits negative examples only after the %g s join window; pass --seconds %g or more",
            args.seconds,
            window_s,
            window_s + 120,
        )
    drift_after = None if args.no_drift else (args.drift_after or args.seconds / 2)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="online-ctr-render-"))
    try:
        results, run = run_demo_and_query(
            dashboards,
            seconds=args.seconds,
            rate=args.rate,
            drift_after_seconds=drift_after,
            step=args.step,
            directory=directory,
        )
    except (DemoFailedError, OnlineCtrError) as error:
        logger.error("rendering failed: %s (the demo's logs stay in %s)", error, directory)
        return 1
    if args.save_data is not None:
        save_data(args.save_data, results, run)
    render_dashboards(dashboards, results, run, args.out)
    if args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
