"""The Grafana dashboards and provisioning files form a valid, consistent set."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.queries import (
    DASHBOARD_DIR,
    annotation_queries,
    dashboard_queries,
    iter_panels,
    load_dashboards,
)

ROOT = Path(__file__).parents[2]
PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
BUILDER = ROOT / "deploy" / "grafana" / "build_dashboards.py"
# Panel types of Grafana's core visualisations that the dashboards use.
PANEL_TYPES = {"row", "timeseries", "stat", "heatmap"}
GRID_COLUMNS = 24
EXPECTED = {"pipeline.json", "model.json", "serving.json", "drift.json"}


def load_builder():
    """Import deploy/grafana/build_dashboards.py, which is a script, not a package module."""
    name = "build_dashboards"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BUILDER)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the class is built.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict]:
    return load_dashboards()


@pytest.fixture(scope="module")
def datasource() -> dict:
    config = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    return source


def test_dashboard_files_present(dashboards) -> None:
    assert set(dashboards) == EXPECTED


def test_dashboards_match_builder(dashboards) -> None:
    rendered = load_builder().render_all()

    assert set(rendered) == set(dashboards)
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text(encoding="utf-8") == text, (
            f"{name} differs from deploy/grafana/build_dashboards.py; run it and commit the JSON"
        )


def test_dashboard_top_level_fields(dashboards) -> None:
    uids = set()
    for name, dashboard in dashboards.items():
        assert isinstance(dashboard["schemaVersion"], int), name
        assert dashboard["schemaVersion"] >= 36, name
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", dashboard["uid"]), name
        assert dashboard["title"], name
        assert "id" not in dashboard or dashboard["id"] is None, f"{name}: provisioned ids clash"
        assert isinstance(dashboard["panels"], list) and dashboard["panels"], name
        assert dashboard["templating"] == {"list": []}, name
        uids.add(dashboard["uid"])

    assert len(uids) == len(dashboards), "dashboard uids must be unique"


def test_panel_ids_unique(dashboards) -> None:
    for name, dashboard in dashboards.items():
        ids = [panel["id"] for panel in iter_panels(dashboard["panels"])]

        assert all(isinstance(panel_id, int) for panel_id in ids), name
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"


def test_panels_have_type_title_and_grid_position(dashboards) -> None:
    for name, dashboard in dashboards.items():
        occupied: set[tuple[int, int]] = set()
        for panel in iter_panels(dashboard["panels"]):
            where = f"{name} / {panel.get('title')}"
            assert panel["type"] in PANEL_TYPES, where
            assert panel["title"], where
            grid = panel["gridPos"]
            assert grid["w"] >= 1, where
            assert grid["h"] >= 1, where
            assert grid["x"] >= 0, where
            assert grid["x"] + grid["w"] <= GRID_COLUMNS, where
            cells = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not cells & occupied, f"{where} overlaps another panel"
            occupied |= cells


def test_panels_use_provisioned_datasource(dashboards, datasource) -> None:
    reference = {"type": datasource["type"], "uid": datasource["uid"]}
    for name, dashboard in dashboards.items():
        for panel in iter_panels(dashboard["panels"]):
            if panel["type"] == "row":
                continue
            where = f"{name} / {panel['title']}"
            assert panel["datasource"] == reference, where
            assert panel["targets"], f"{where} has no query"
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), where
            for target in panel["targets"]:
                assert target["datasource"] == reference, where
        for annotation in dashboard["annotations"]["list"]:
            assert annotation["datasource"] == reference, f"{name} / {annotation['name']}"


def test_queries_are_plain_promql() -> None:
    for query in dashboard_queries() + annotation_queries():
        # Grafana variables such as $__rate_interval would not parse in Prometheus.
        assert "$" not in query.expr, query.where
        assert query.metric_names() or "up{" in query.expr, query.where


def test_panels_have_descriptions_and_units(dashboards) -> None:
    for name, dashboard in dashboards.items():
        for panel in iter_panels(dashboard["panels"]):
            if panel["type"] == "row":
                continue
            assert panel["description"], f"{name} / {panel['title']}"
            assert panel["fieldConfig"]["defaults"]["unit"], f"{name} / {panel['title']}"


def test_required_views_present() -> None:
    expressions = {query.where.split(" / ")[0]: [] for query in dashboard_queries()}
    for query in dashboard_queries():
        expressions[query.where.split(" / ")[0]].append(query.expr)
    required = {
        "pipeline.json": [
            "octr_joiner_events_consumed_total",
            "octr_joiner_join_outcomes_total",
            "octr_joiner_label_delay_seconds_bucket",
            "octr_joiner_pending_impressions",
            "octr_joiner_watermark_lag_seconds",
            "octr_joiner_consumer_lag_records",
            "octr_trainer_consumer_lag_records",
            "octr_joiner_dead_letter_total",
        ],
        "model.json": [
            "octr_trainer_normalized_entropy",
            "octr_trainer_log_loss",
            "octr_trainer_auc",
            "octr_trainer_calibration",
            "octr_trainer_segment_normalized_entropy",
            "octr_trainer_model_version",
            "octr_scorer_model_version",
            "octr_trainer_last_snapshot_timestamp_seconds",
        ],
        "serving.json": [
            "octr_scorer_requests_total",
            "octr_scorer_request_duration_seconds_bucket",
            "octr_scorer_model_reloads_total",
        ],
        "drift.json": [
            "octr_scorer_feature_psi",
            "octr_scorer_score_psi",
            "octr_scorer_psi_threshold",
            "octr_scorer_feature_missing_ratio",
            "octr_scorer_feature_unseen_category_ratio",
            "octr_scorer_prediction_drifts_total",
        ],
    }

    for name, metrics in required.items():
        text = "\n".join(expressions[name])
        for metric in metrics:
            assert metric in text, f"{name} has no panel on {metric}"


def test_scorer_metric_names_exist() -> None:
    """Every octr_scorer_* name the dashboards read is defined in the scorer's metrics."""
    from prometheus_client import CollectorRegistry

    from services.scorer.metrics import ScorerMetrics

    registry = CollectorRegistry()
    ScorerMetrics(registry)
    defined = {metric.name for metric in registry.collect()}
    for query in dashboard_queries():
        for name in query.metric_names():
            if not name.startswith("octr_scorer_"):
                continue
            base = re.sub(r"_(total|bucket|sum|count)$", "", name)
            assert base in defined, f"{query.where}: {name} is not a scorer metric"


def test_provisioning_points_at_dashboards(datasource) -> None:
    config = yaml.safe_load((PROVISIONING / "dashboards" / "online-ctr.yml").read_text())
    (provider,) = config["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]

    assert config["apiVersion"] == 1
    assert provider["type"] == "file"
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert datasource["uid"] == load_builder().DATASOURCE["uid"]
    assert datasource["url"] == "http://prometheus:9090"


def test_dashboard_json_is_canonical() -> None:
    for path in DASHBOARD_DIR.glob("*.json"):
        text = path.read_text(encoding="utf-8")
        assert text == json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
