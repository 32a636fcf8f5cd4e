"""Every PromQL expression of the dashboards and the alert rules, with where it comes from."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
DASHBOARD_DIR = ROOT / "deploy" / "grafana" / "dashboards"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
METRIC_NAME = re.compile(r"\b(octr_[a-z0-9_]+)")


@dataclass(frozen=True)
class Expression:
    """One PromQL expression and a label naming the file and panel or rule it comes from."""

    where: str
    expr: str

    def metric_names(self) -> set[str]:
        """Return the online-ctr metric names the expression reads."""
        return set(METRIC_NAME.findall(self.expr))


def load_dashboards() -> dict[str, dict]:
    """Return ``{file name: dashboard model}`` for every dashboard JSON file."""
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(DASHBOARD_DIR.glob("*.json"))
    }


def iter_panels(panels: list[dict]) -> Iterator[dict]:
    """Yield every panel, the ones nested in collapsed rows included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def dashboard_queries() -> list[Expression]:
    """Return the expression of every panel target of every dashboard."""
    queries = []
    for name, dashboard in load_dashboards().items():
        for panel in iter_panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                where = f"{name} / {panel['title']} / {target['refId']}"
                queries.append(Expression(where, target["expr"]))
    return queries


def annotation_queries() -> list[Expression]:
    """Return the expression of every Prometheus annotation of every dashboard."""
    return [
        Expression(f"{name} / annotation {annotation['name']}", annotation["expr"])
        for name, dashboard in load_dashboards().items()
        for annotation in dashboard["annotations"]["list"]
        if "expr" in annotation
    ]


def alert_expressions() -> list[Expression]:
    """Return the expression of every alerting rule."""
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [
        Expression(f"alert {rule['alert']}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]
