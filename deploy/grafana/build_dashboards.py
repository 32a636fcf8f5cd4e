"""Write the Grafana dashboards of online-ctr as JSON, the classic dashboard model.

The dashboards are defined here, as data, and written to
``deploy/grafana/dashboards/*.json``, which Grafana's file provider loads.
Edit this file and run it from the repository root, then commit both::

    .venv/bin/python deploy/grafana/build_dashboards.py

``tests/deploy/test_dashboards.py`` fails when the JSON files differ from
what this script writes, and the live monitoring test sends every query
below to a Prometheus that scrapes the running services.

Queries use fixed rate windows (``[1m]``, ``[5m]``) instead of Grafana's
``$__rate_interval``, so that Prometheus itself can check every expression.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

DASHBOARD_DIR = Path(__file__).parent / "dashboards"
# The data source that deploy/grafana/provisioning/datasources/prometheus.yml creates.
DATASOURCE = {"type": "prometheus", "uid": "octr-prometheus"}
# Grafana 11 reads this schema version without migrating it.
SCHEMA_VERSION = 39
GRID_COLUMNS = 24
PANEL_HEIGHT = 8


@dataclasses.dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and the legend of its series."""

    expr: str
    legend: str = ""


@dataclasses.dataclass(frozen=True)
class Panel:
    """A panel before layout: the title, what it shows and how."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    thresholds: tuple[tuple[str, float | None], ...] = ()
    decimals: int | None = None


@dataclasses.dataclass(frozen=True)
class Row:
    """A titled row of panels, laid out left to right and wrapped at 24 columns."""

    title: str
    panels: tuple[Panel, ...]


def _target(query: Query, ref_id: str, kind: str) -> dict[str, Any]:
    target: dict[str, Any] = {
        "refId": ref_id,
        "datasource": DATASOURCE,
        "expr": query.expr,
        "legendFormat": query.legend or "__auto",
        "range": kind != "stat",
        "instant": kind == "stat",
    }
    if kind == "heatmap":
        target["format"] = "heatmap"
    return target


def _field_config(panel: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    steps = [{"color": "green", "value": None}]
    for color, value in panel.thresholds:
        steps.append({"color": color, "value": value})
    defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "spanNulls": False,
        }
        if panel.thresholds:
            defaults["custom"]["thresholdsStyle"] = {"mode": "dashed"}
    return {"defaults": defaults, "overrides": []}


def _options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "textMode": "auto",
            "orientation": "auto",
        }
    if panel.kind == "heatmap":
        return {
            "calculate": False,
            "yAxis": {"axisPlacement": "left", "unit": panel.unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "tooltip": {"mode": "single", "yHistogram": False},
            "legend": {"show": True},
        }
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": PANEL_HEIGHT, "w": panel.width, "x": x, "y": y},
        "fieldConfig": _field_config(panel),
        "options": _options(panel),
        "targets": [
            _target(query, chr(ord("A") + index), panel.kind)
            for index, query in enumerate(panel.queries)
        ],
    }


def build_dashboard(uid: str, title: str, description: str, rows: list[Row]) -> dict[str, Any]:
    """Lay the rows out on Grafana's 24-column grid and return the dashboard model."""
    panels: list[dict[str, Any]] = []
    panel_id = 0
    y = 0
    for row in rows:
        panel_id += 1
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_COLUMNS, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > GRID_COLUMNS:
                x = 0
                y += PANEL_HEIGHT
            panel_id += 1
            panels.append(_panel_json(panel, panel_id, x, y))
            x += panel.width
        y += PANEL_HEIGHT

    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["online-ctr"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": [_drift_annotation()]},
        "links": [
            {
                "type": "dashboards",
                "tags": ["online-ctr"],
                "asDropdown": False,
                "title": "online-ctr",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "panels": panels,
    }


def _drift_annotation() -> dict[str, Any]:
    # Marks the moment the demo population switches behaviour; without the
    # simulator it never fires.
    return {
        "name": "Simulated drift",
        "datasource": DATASOURCE,
        "enable": True,
        "iconColor": "purple",
        "expr": "changes(octr_simulator_drift_active[1m]) > 0",
        "step": "15s",
        "titleFormat": "Population drift",
        "textFormat": "The simulator switched the population's behaviour",
    }


# Pipeline: joiner and trainer throughput, join outcomes, lags.

PIPELINE = [
    Row(
        "Throughput",
        (
            Panel(
                "Impressions and clicks consumed",
                "Records the joiner reads per second, by topic; invalid ones included.",
                (
                    Query(
                        "sum by (topic) (rate(octr_joiner_events_consumed_total[1m]))", "{{topic}}"
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Examples emitted by label and reason",
                "Labelled examples the joiner produces per second. A click decides a positive "
                "at once; a closed window decides a negative.",
                (
                    Query(
                        "sum by (label, reason) (rate(octr_joiner_examples_emitted_total[1m]))",
                        "label {{label}} ({{reason}})",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Join outcomes",
                "What the join did with each event, per second: windows opened and closed, "
                "clicks attributed, held, late, orphaned or duplicated.",
                (
                    Query(
                        "sum by (outcome) (rate(octr_joiner_join_outcomes_total[1m]))",
                        "{{outcome}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Examples learned by the trainer",
                "Examples learned per second by label, and duplicates the trainer dropped.",
                (
                    Query(
                        "sum by (label) (rate(octr_trainer_examples_learned_total[1m]))",
                        "learned, label {{label}}",
                    ),
                    Query(
                        "sum(rate(octr_trainer_duplicates_dropped_total[1m]))",
                        "duplicates dropped",
                    ),
                ),
                unit="reqps",
            ),
        ),
    ),
    Row(
        "Labels",
        (
            Panel(
                "Label delay quantiles",
                "Event time from an impression to its decided label. Positives take the click "
                "delay; negatives take the window plus the watermark's lateness.",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le, label) "
                        "(rate(octr_joiner_label_delay_seconds_bucket[5m])))",
                        "p50 label {{label}}",
                    ),
                    Query(
                        "histogram_quantile(0.9, sum by (le, label) "
                        "(rate(octr_joiner_label_delay_seconds_bucket[5m])))",
                        "p90 label {{label}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Click delay distribution",
                "Positives per label-delay bucket and minute.",
                (
                    Query(
                        'sum by (le) (increase(octr_joiner_label_delay_seconds_bucket{label="1"}'
                        "[1m]))",
                        "{{le}}",
                    ),
                ),
                unit="s",
                kind="heatmap",
            ),
            Panel(
                "Pending impressions",
                "Impressions whose attribution window is still open, by partition.",
                (
                    Query("sum by (partition) (octr_joiner_pending_impressions)", "p{{partition}}"),
                    Query("sum(octr_joiner_pending_impressions)", "total"),
                ),
            ),
        ),
    ),
    Row(
        "Lag and errors",
        (
            Panel(
                "Watermark lag",
                "Wall-clock time minus each partition's watermark. It includes the allowed "
                "lateness and grows while a partition receives nothing.",
                (
                    Query(
                        "max by (partition) (octr_joiner_watermark_lag_seconds)",
                        "p{{partition}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Consumer lag",
                "Records on the broker that the consumers have not read yet.",
                (
                    Query(
                        "sum by (topic) (octr_joiner_consumer_lag_records)",
                        "joiner {{topic}}",
                    ),
                    Query("sum(octr_trainer_consumer_lag_records)", "trainer examples"),
                ),
                thresholds=(("red", 50_000),),
            ),
            Panel(
                "Dead-letter rate",
                "Share of consumed records sent to the dead-letter topic, and the rate by "
                "topic and reason. The alert fires above 1 % for 10 minutes.",
                (
                    Query(
                        "sum(rate(octr_joiner_dead_letter_total[5m])) / "
                        "sum(rate(octr_joiner_events_consumed_total[5m]))",
                        "share of consumed",
                    ),
                    Query(
                        "sum by (topic, reason) (rate(octr_joiner_dead_letter_total[5m]))",
                        "{{topic}} {{reason}} per s",
                    ),
                ),
                unit="short",
                thresholds=(("red", 0.01),),
            ),
            Panel(
                "Joiner batch duration p99",
                "Time to join, produce and commit one poll's records.",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (le) "
                        "(rate(octr_joiner_batch_duration_seconds_bucket[5m])))",
                        "p99",
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "Demo traffic (simulator only)",
        (
            Panel(
                "Simulated impressions and clicks",
                "Impressions the simulator sent to the scorer by result, and clicks it sent to "
                "the clicks topic. Empty in deployments without the simulator.",
                (
                    Query(
                        "sum by (result) (rate(octr_simulator_impressions_total[1m]))",
                        "impressions {{result}}",
                    ),
                    Query(
                        "sum by (result) (rate(octr_simulator_clicks_total[1m]))",
                        "clicks {{result}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Simulated clicks pending",
                "Clicks drawn by the simulator and waiting for their time.",
                (Query("sum(octr_simulator_pending_clicks)", "pending"),),
            ),
        ),
    ),
]

# Model: progressive evaluation of served scores, model against baseline.

SEGMENT_NE = "octr_trainer_segment_normalized_entropy"

MODEL = [
    Row(
        "Versions",
        (
            Panel(
                "Published model version",
                "Version of the newest snapshot the trainer published.",
                (Query("max(octr_trainer_model_version)", "trainer"),),
                kind="stat",
                width=6,
                decimals=0,
            ),
            Panel(
                "Served model version",
                "Version each scorer arm serves.",
                (Query("max by (arm) (octr_scorer_model_version)", "{{arm}}"),),
                kind="stat",
                width=6,
                decimals=0,
            ),
            Panel(
                "Snapshot age",
                "Seconds since the trainer published its newest snapshot.",
                (Query("time() - max(octr_trainer_last_snapshot_timestamp_seconds)", "trainer"),),
                unit="s",
                kind="stat",
                width=6,
                thresholds=(("orange", 300), ("red", 600)),
            ),
            Panel(
                "Served model age",
                "Seconds since the snapshot each scorer arm serves was created.",
                (Query("max by (arm) (octr_scorer_model_age_seconds)", "{{arm}}"),),
                unit="s",
                kind="stat",
                width=6,
                thresholds=(("orange", 300), ("red", 600)),
            ),
        ),
    ),
    Row(
        "Model against baseline (rolling window)",
        (
            Panel(
                "Normalised entropy",
                "Log loss of served scores divided by the entropy of the click rate, over the "
                "trainer's rolling window; lower is better and 1 is no better than the click "
                "rate. The alert fires when the model stays above the baseline for 30 minutes.",
                (Query("max by (arm) (octr_trainer_normalized_entropy)", "{{arm}}"),),
            ),
            Panel(
                "Log loss",
                "Log loss in nats of served scores over the rolling window.",
                (Query("max by (arm) (octr_trainer_log_loss)", "{{arm}}"),),
            ),
            Panel(
                "AUC",
                "ROC AUC of served scores over the rolling window. The baseline predicts one "
                "rate for everyone, so its AUC is undefined and usually missing.",
                (Query("max by (arm) (octr_trainer_auc)", "{{arm}}"),),
            ),
            Panel(
                "Calibration",
                "Sum of predictions over sum of clicks over the rolling window; 1 is calibrated.",
                (Query("max by (arm) (octr_trainer_calibration)", "{{arm}}"),),
                thresholds=(("orange", 1.2),),
            ),
            Panel(
                "Normalised entropy since start",
                "Normalised entropy of every example since the trainer started.",
                (Query("max by (arm) (octr_trainer_normalized_entropy_overall)", "{{arm}}"),),
            ),
            Panel(
                "True and served click rate (simulator only)",
                "The simulator's true click rate against the clicks the pipeline labelled. "
                "Empty in deployments without the simulator.",
                (
                    Query(
                        "sum(rate(octr_simulator_expected_clicks_total[5m])) / "
                        "sum(rate(octr_simulator_shown_impressions_total[5m]))",
                        "true click rate",
                    ),
                    # Served notices are not labels, so they stay out of the rate.
                    Query(
                        'sum(rate(octr_joiner_examples_emitted_total{label="1"}[5m])) / '
                        'sum(rate(octr_joiner_examples_emitted_total{reason!="served"}[5m]))',
                        "labelled click rate",
                    ),
                ),
                unit="percentunit",
            ),
        ),
    ),
    Row(
        "Segments (since start)",
        (
            Panel(
                "Normalised entropy per segment",
                "Normalised entropy of the model per value of each ONLINE_CTR_SEGMENT_BY feature.",
                (
                    Query(
                        f'max by (feature, value) ({SEGMENT_NE}{{arm="model"}})',
                        "{{feature}}={{value}}",
                    ),
                ),
            ),
            Panel(
                "Model minus baseline per segment",
                "Normalised entropy of the model minus that of the baseline per segment; "
                "above 0 the model is worse than the click rate there.",
                (
                    Query(
                        f'max by (feature, value) ({SEGMENT_NE}{{arm="model"}}) '
                        f'- max by (feature, value) ({SEGMENT_NE}{{arm="baseline"}})',
                        "{{feature}}={{value}}",
                    ),
                ),
                thresholds=(("red", 0),),
            ),
            Panel(
                "Examples per segment",
                "Examples evaluated per segment since the trainer started.",
                (
                    Query(
                        "max by (feature, value) (octr_trainer_segment_examples)",
                        "{{feature}}={{value}}",
                    ),
                ),
            ),
        ),
    ),
]

# Serving: the scorer's traffic, latency, errors and model reloads.

SCORE_ENDPOINT = 'endpoint="/v1/score"'

SERVING = [
    Row(
        "Traffic",
        (
            Panel(
                "Requests per second",
                "Scorer requests per second by endpoint; a batch request counts once per "
                "impression.",
                (
                    Query(
                        "sum by (endpoint) (rate(octr_scorer_requests_total[1m]))",
                        "{{endpoint}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Traffic per arm",
                "Scored impressions per second by the arm that scored them.",
                (
                    Query(
                        'sum by (arm) (rate(octr_scorer_requests_total{arm!="none"}[1m]))',
                        "{{arm}}",
                    ),
                ),
                unit="reqps",
            ),
        ),
    ),
    Row(
        "Latency and errors",
        (
            Panel(
                "Scoring latency",
                "p50 and p99 of POST /v1/score from the scorer's histogram. The alert fires "
                "when p99 stays above 50 ms for 10 minutes.",
                (
                    Query(
                        "histogram_quantile(0.5, sum by (le) (rate("
                        f"octr_scorer_request_duration_seconds_bucket{{{SCORE_ENDPOINT}}}[5m])))",
                        "p50",
                    ),
                    Query(
                        "histogram_quantile(0.99, sum by (le) (rate("
                        f"octr_scorer_request_duration_seconds_bucket{{{SCORE_ENDPOINT}}}[5m])))",
                        "p99",
                    ),
                ),
                unit="s",
                thresholds=(("red", 0.05),),
            ),
            Panel(
                "Errors",
                "Requests per second that ended in a 4xx or 5xx status, by endpoint and "
                "status, and impressions a model raised an error on.",
                (
                    Query(
                        "sum by (endpoint, status) "
                        '(rate(octr_scorer_requests_total{status=~"[45].."}[5m]))',
                        "{{endpoint}} {{status}}",
                    ),
                    Query(
                        "sum by (arm) (rate(octr_scorer_scoring_errors_total[5m]))",
                        "model error {{arm}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Impression log",
                "Served impressions per second that the broker acknowledged, and those "
                "dropped by reason; the trainer never learns from dropped ones.",
                (
                    Query("sum(rate(octr_scorer_impression_log_sent_total[1m]))", "sent"),
                    Query(
                        "sum by (reason) (rate(octr_scorer_impression_log_dropped_total[5m]))",
                        "dropped {{reason}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Impression log queue",
                "Served impressions waiting for the Kafka producer, summed over workers.",
                (Query("sum(octr_scorer_impression_log_queue_records)", "queued"),),
            ),
        ),
    ),
    Row(
        "Model reloads",
        (
            Panel(
                "Reloads",
                "Snapshots loaded per 5 minutes by arm, and failed loads by arm and reason; "
                "after a failure the previous model keeps serving.",
                (
                    Query(
                        "sum by (arm) (increase(octr_scorer_model_reloads_total[5m]))",
                        "loaded {{arm}}",
                    ),
                    Query(
                        "sum by (arm, reason) "
                        "(increase(octr_scorer_model_reload_failures_total[5m]))",
                        "failed {{arm}} {{reason}}",
                    ),
                ),
            ),
            Panel(
                "Scorer targets up",
                "Scorer instances that Prometheus scraped successfully.",
                (Query('sum(up{job="scorer"})', "up"),),
                kind="stat",
                width=6,
                decimals=0,
            ),
        ),
    ),
]

# Drift: the scorer's live feature distributions against the training profile.

DRIFT = [
    Row(
        "Population stability index",
        (
            Panel(
                "PSI per feature",
                "PSI of each feature over the scorer's drift window against the reference "
                "profile of the champion snapshot, and the threshold the scorer uses.",
                (
                    Query("max by (feature) (octr_scorer_feature_psi)", "{{feature}}"),
                    Query("max(octr_scorer_psi_threshold)", "threshold"),
                ),
            ),
            Panel(
                "PSI of the predicted click probability",
                "PSI of the champion's predictions over the drift window against the scores "
                "of the training traffic.",
                (
                    Query("max(octr_scorer_score_psi)", "score"),
                    Query("max(octr_scorer_psi_threshold)", "threshold"),
                ),
            ),
            Panel(
                "Mean predicted click rate",
                "Mean champion prediction over the drift window, and the simulator's true "
                "click rate where the simulator runs.",
                (
                    Query("avg(octr_scorer_predicted_ctr_mean)", "predicted"),
                    Query(
                        "sum(rate(octr_simulator_expected_clicks_total[5m])) / "
                        "sum(rate(octr_simulator_shown_impressions_total[5m]))",
                        "true (simulator)",
                    ),
                ),
                unit="percentunit",
            ),
        ),
    ),
    Row(
        "Missing and unseen values",
        (
            Panel(
                "Missing share rise per feature",
                "Share of requests without the feature in the drift window minus that share "
                "in the training reference, and the rise the scorer counts as drift.",
                (
                    Query(
                        "max by (feature) (octr_scorer_feature_missing_ratio "
                        "- octr_scorer_feature_reference_missing_ratio)",
                        "{{feature}}",
                    ),
                    Query("max(octr_scorer_missing_ratio_threshold)", "threshold"),
                ),
                unit="percentunit",
            ),
            Panel(
                "Unseen category share per feature",
                "Share of a categorical feature's values in the drift window that the "
                "reference never listed, and the share the scorer counts as drift.",
                (
                    Query(
                        "max by (feature) (octr_scorer_feature_unseen_category_ratio)",
                        "{{feature}}",
                    ),
                    Query("max(octr_scorer_unseen_category_ratio_threshold)", "threshold"),
                ),
                unit="percentunit",
            ),
            Panel(
                "Prediction drift detections",
                "Changes in the champion's predicted click rate that ADWIN detected, per 15 "
                "minutes, and the requests in the drift window.",
                (
                    Query(
                        "sum(increase(octr_scorer_prediction_drifts_total[15m]))",
                        "detections",
                    ),
                    Query("sum(octr_scorer_drift_window_requests)", "window requests"),
                ),
            ),
        ),
    ),
]

DASHBOARDS = {
    "pipeline": (
        "octr-pipeline",
        "online-ctr / Pipeline",
        "Joiner and trainer: throughput, join outcomes, label delays, lags and dead letters.",
        PIPELINE,
    ),
    "model": (
        "octr-model",
        "online-ctr / Model",
        "Progressive evaluation of served scores: model against the click-rate baseline.",
        MODEL,
    ),
    "serving": (
        "octr-serving",
        "online-ctr / Serving",
        "Scorer traffic, latency, errors, arms and model reloads.",
        SERVING,
    ),
    "drift": (
        "octr-drift",
        "online-ctr / Drift",
        "Live feature and score distributions against the served snapshot's training profile.",
        DRIFT,
    ),
}


def render_all() -> dict[str, str]:
    """Return ``{file name: JSON text}`` for every dashboard."""
    return {
        f"{name}.json": json.dumps(build_dashboard(*spec), indent=2, ensure_ascii=False) + "\n"
        for name, spec in DASHBOARDS.items()
    }


def main() -> int:
    DASHBOARD_DIR.mkdir(parents=True, exist_ok=True)
    for file_name, text in render_all().items():
        (DASHBOARD_DIR / file_name).write_text(text, encoding="utf-8")
        print(f"wrote {DASHBOARD_DIR / file_name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
