"""The Prometheus configuration and alert rules pass promtool and name real metrics."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from shared.demo_local import SCRAPE_JOBS
from shared.localstack import find_promtool_bin
from tests.conftest import _require_binary

ROOT = Path(__file__).parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
CONFIG = PROMETHEUS_DIR / "prometheus.yml"

# The alerts the deployment promises, each with the metric it watches.
REQUIRED_ALERTS = {
    "ServedModelStale": "octr_scorer_model_age_seconds",
    "ModelSnapshotStale": "octr_trainer_last_snapshot_timestamp_seconds",
    "JoinerConsumerLagHigh": "octr_joiner_consumer_lag_records",
    "TrainerConsumerLagHigh": "octr_trainer_consumer_lag_records",
    "DeadLetterRateHigh": "octr_joiner_dead_letter_total",
    "ModelWorseThanBaseline": "octr_trainer_normalized_entropy",
    "FeatureDrift": "octr_scorer_psi_threshold",
    "ScoreDrift": "octr_scorer_psi_threshold",
    "ScorerLatencyHigh": "octr_scorer_request_duration_seconds_bucket",
    "ScorerNotReady": 'up{job="scorer"}',
}


@pytest.fixture(scope="module")
def promtool() -> str:
    return _require_binary(find_promtool_bin)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_rules(promtool) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(promtool) -> None:
    # check config also checks the rule files that the configuration names.
    result = subprocess.run(
        [promtool, "check", "config", str(CONFIG)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_required_alerts_present() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}

    for name, metric in REQUIRED_ALERTS.items():
        assert name in rules, f"alert {name} is missing"
        assert metric in rules[name]["expr"], f"alert {name} does not watch {metric}"


def test_alerts_have_severity_summary_and_duration() -> None:
    for rule in alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"alert {name}: for {rule['for']!r}"


def test_drift_alerts_compare_against_exported_thresholds() -> None:
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}

    assert "octr_scorer_psi_threshold" in rules["FeatureDrift"]
    assert "octr_scorer_missing_ratio_threshold" in rules["FeatureMissingShareRose"]
    assert "octr_scorer_unseen_category_ratio_threshold" in rules["UnseenCategoriesHigh"]


def test_model_age_alerts_read_exported_gauges() -> None:
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}

    assert "octr_scorer_max_model_age_seconds" in rules["ServedModelStale"]
    assert "octr_scorer_ready" in rules["ScorerNotReady"]
    assert "3600" not in rules["ServedModelStale"] + rules["ScorerNotReady"]


def test_constant_thresholds_match_service_defaults() -> None:
    from services.trainer.settings import TrainerSettings

    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    snapshot_every = TrainerSettings.model_fields["snapshot_every_seconds"].default

    assert f"> {snapshot_every * 10:g}" in rules["ModelSnapshotStale"]


# Series and expected alerts for `promtool test rules`, run on a copy of the
# rules without annotations, which promtool would otherwise compare too. The scorer's maximum
# model age is 600 s, not the default, so the alert must follow the gauge.
# Instance a serves a model that ages 30 s per minute. It passes 300 s, half
# the maximum, after 10 minutes, so ServedModelStale fires 5 minutes later.
# The readiness gauge of instance b drops to 0 at minute 2, so ScorerNotReady
# fires 5 minutes later.
SCORER_ALERT_TESTS = """
rule_files:
  - {alerts}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="scorer", instance="a"}}'
        values: '1x30'
      - series: 'up{{job="scorer", instance="b"}}'
        values: '1x30'
      - series: 'octr_scorer_max_model_age_seconds{{job="scorer", instance="a"}}'
        values: '600x30'
      - series: 'octr_scorer_max_model_age_seconds{{job="scorer", instance="b"}}'
        values: '600x30'
      - series: 'octr_scorer_model_age_seconds{{job="scorer", instance="a", arm="champion"}}'
        values: '0+30x30'
      - series: 'octr_scorer_model_age_seconds{{job="scorer", instance="b", arm="champion"}}'
        values: '10x30'
      - series: 'octr_scorer_ready{{job="scorer", instance="a"}}'
        values: '1x30'
      - series: 'octr_scorer_ready{{job="scorer", instance="b"}}'
        values: '1 1 0x28'
    alert_rule_test:
      - eval_time: 14m
        alertname: ServedModelStale
        exp_alerts: []
      - eval_time: 16m
        alertname: ServedModelStale
        exp_alerts:
          - exp_labels: {{severity: warning, job: scorer, instance: a}}
      - eval_time: 6m
        alertname: ScorerNotReady
        exp_alerts: []
      - eval_time: 8m
        alertname: ScorerNotReady
        exp_alerts:
          - exp_labels: {{severity: critical, job: scorer, instance: b}}
"""


def test_scorer_alerts_fire_on_exported_gauges(promtool, tmp_path) -> None:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    for group in groups["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    alerts = tmp_path / "alerts.yml"
    alerts.write_text(yaml.safe_dump(groups), encoding="utf-8")
    tests = tmp_path / "scorer_alerts_test.yml"
    tests.write_text(SCORER_ALERT_TESTS.format(alerts=alerts), encoding="utf-8")

    result = subprocess.run(
        [promtool, "test", "rules", str(tests)], capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_scrape_jobs_match_local_demo() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    jobs = {job["job_name"] for job in config["scrape_configs"]}

    assert jobs - {"prometheus"} == set(SCRAPE_JOBS)
    assert config["rule_files"] == ["alerts.yml"]
