"""Every dashboard query and alert rule, sent to a real Prometheus that scrapes the live stack.

The joiner, trainer, scorer and simulator run as processes against the
session's broker and Redis, with short windows and cadences, and a local
Prometheus scrapes them with the deployment's job names and alert rules.
The simulator's population drifts after 30 s. Then every expression must
parse, and every dashboard query must return at least one series, except
the few listed in NO_DATA_EXPECTED with the reason.
"""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.parse
import urllib.request

import orjson
import pytest
from kafka import KafkaProducer

from shared.demo_local import SCRAPE_JOBS, DeployedPrometheusServer
from shared.localstack import LOOPBACK_HOST, find_free_port
from tests.deploy.queries import alert_expressions, annotation_queries, dashboard_queries
from tests.services.conftest import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIGNING_KEY = "k1:" + "cd" * 32
DRIFT_AFTER_SECONDS = 30
# Long enough for the drifted traffic to fill the scorer's drift window.
RUN_AFTER_DRIFT_SECONDS = 15
QUERY_DEADLINE_SECONDS = 150
INVALID_RECORDS = 3

# Dashboard queries that return nothing in a healthy run, with the reason.
# Each still has to parse, and its metric has to be exported (see below).
NO_DATA_EXPECTED = {
    "serving.json / Errors / B": "no model raised an error while scoring",
    "serving.json / Impression log / B": "the scorer dropped no served impression",
    "serving.json / Reloads / B": "every snapshot the scorer loaded passed verification",
}


@pytest.fixture
def live_env(pipeline_env: dict[str, str], unique_name: str) -> dict[str, str]:
    """Settings of all four services, with windows and cadences of seconds."""
    return {
        **pipeline_env,
        # Joiner: a 10 s window, so negatives are decided within the run.
        "ONLINE_CTR_WINDOW_SECONDS": "10",
        "ONLINE_CTR_ALLOWED_LATENESS_SECONDS": "2",
        "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "3",
        # Trainer and scorer share the registry.
        "ONLINE_CTR_SIGNING_KEYS": SIGNING_KEY,
        "ONLINE_CTR_SIGNING_KEY_ID": "k1",
        "ONLINE_CTR_REGISTRY_NAMESPACE": f"{unique_name}:models",
        "ONLINE_CTR_DEDUP_NAMESPACE": f"{unique_name}:trainer",
        "ONLINE_CTR_SNAPSHOT_EVERY_SECONDS": "2",
        "ONLINE_CTR_ROLLING_WINDOW": "500",
        "ONLINE_CTR_SEGMENT_BY": "user_segment,category",
        "ONLINE_CTR_RELOAD_POLL_INTERVAL_SECONDS": "1",
        "ONLINE_CTR_DRIFT_WINDOW_SIZE": "500",
        "ONLINE_CTR_DRIFT_REFRESH_SECONDS": "1",
        # Simulator: 50 impressions/s, clicks within the window, drift after 30 s.
        "ONLINE_CTR_IMPRESSIONS_PER_SECOND": "50",
        "ONLINE_CTR_CLICK_DELAY_MEDIAN_SECONDS": "2",
        "ONLINE_CTR_CLICK_DELAY_MAX_SECONDS": "8",
        "ONLINE_CTR_POPULATION_DRIFT_AFTER_SECONDS": str(DRIFT_AFTER_SECONDS),
        "ONLINE_CTR_POPULATION_DRIFT_NEW_ITEM_SHARE": "0.3",
        "ONLINE_CTR_POPULATION_DRIFT_MISSING_PRICE_SHARE": "0.2",
    }


def prometheus_get(prometheus: DeployedPrometheusServer, path: str, **params: str) -> dict:
    url = f"{prometheus.url}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return orjson.loads(response.read())["data"]


def exported_metric_names(prometheus: DeployedPrometheusServer) -> set[str]:
    """Return the metric families the targets expose, with or without samples."""
    names = set(prometheus_get(prometheus, "/api/v1/metadata"))
    names |= set(prometheus_get(prometheus, "/api/v1/label/__name__/values"))
    return names


def family(name: str) -> str:
    """Return the metric family of a sample name, as the metadata API lists it."""
    return re.sub(r"_(total|bucket|sum|count)$", "", name)


def score_invalid_request(scorer_url: str) -> int:
    """Send one request that the scorer must reject, so its error series exist."""
    request = urllib.request.Request(
        f"{scorer_url}/v1/score",
        data=b'{"item_id": ""}',
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def produce_invalid_impressions(bootstrap: str, topic: str) -> None:
    """Produce records the joiner must dead-letter: not JSON, and a key that differs."""
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    for index in range(INVALID_RECORDS):
        producer.send(topic, key=f"bad-{index}".encode(), value=b"not json")
    producer.flush(timeout=10)
    producer.close()


def test_every_query_parses_and_dashboards_have_data(
    live_env, start_service, kafka_broker, tmp_path
) -> None:
    started = time.monotonic()
    ports = {job: find_free_port() for job in SCRAPE_JOBS}
    scorer_url = f"http://{LOOPBACK_HOST}:{ports['scorer']}"
    env = {**live_env, "ONLINE_CTR_SCORER_URL": scorer_url}

    services = {}
    for name in ("trainer", "joiner", "scorer", "simulator"):
        service_env = dict(env)
        if name == "scorer":
            service_env["ONLINE_CTR_HTTP_HOST"] = LOOPBACK_HOST
            service_env["ONLINE_CTR_HTTP_PORT"] = str(ports[name])
            service_env["ONLINE_CTR_METRICS_PORT"] = "0"
        else:
            service_env["ONLINE_CTR_METRICS_PORT"] = str(ports[name])
        services[name] = start_service([name], service_env, name=name)

    targets = {job: [f"{LOOPBACK_HOST}:{port}"] for job, port in ports.items()}
    prometheus = DeployedPrometheusServer(targets, workdir=tmp_path / "prometheus")
    prometheus.start()
    try:
        _exercise_and_check(prometheus, services, env, scorer_url, kafka_broker, started)
    finally:
        prometheus.close()

    for name in ("simulator", "scorer", "joiner", "trainer"):
        code = services[name].stop()
        # uvicorn re-raises the SIGTERM it handled, so the scorer may end with -15.
        if name != "scorer":
            assert code == 0, f"{name} exited with {code}:\n{services[name].log()[-3000:]}"
    assert time.monotonic() - started < 180, "the live monitoring test took over 3 minutes"


def _exercise_and_check(prometheus, services, env, scorer_url, kafka_broker, started) -> None:
    running = tuple(services.values())

    # Until the trainer publishes a model the scorer returns 503, and the
    # simulator produces its impressions unscored; this waits for the model.
    wait_until(
        lambda: prometheus.query('octr_scorer_model_version{arm="champion"} > 0'),
        timeout=60,
        message="the scorer never served a model",
        services=running,
    )
    assert score_invalid_request(scorer_url) == 422
    produce_invalid_impressions(kafka_broker.bootstrap, env["ONLINE_CTR_TOPIC_IMPRESSIONS"])

    # Let the drifted population fill the scorer's drift window.
    wait_until(
        lambda: prometheus.query("max(octr_simulator_drift_active) == 1"),
        timeout=DRIFT_AFTER_SECONDS + 30,
        message="the simulated population never drifted",
        services=running,
    )
    time.sleep(RUN_AFTER_DRIFT_SECONDS)
    for service in running:
        assert service.is_running(), f"{service.log_path.name} exited:\n{service.log()[-3000:]}"

    # Every expression parses: Prometheus rejects a bad one with an error.
    for expression in alert_expressions() + annotation_queries() + dashboard_queries():
        prometheus.query(expression.expr)

    exported = {family(name) for name in exported_metric_names(prometheus)}
    for expression in dashboard_queries() + alert_expressions():
        for name in expression.metric_names():
            assert family(name) in exported, f"{expression.where}: {name} is not exported"

    queries = [q for q in dashboard_queries() if q.where not in NO_DATA_EXPECTED]
    assert len(NO_DATA_EXPECTED) == len(dashboard_queries()) - len(queries), (
        "NO_DATA_EXPECTED names a query that no dashboard has"
    )
    deadline = started + QUERY_DEADLINE_SECONDS
    missing = queries
    while missing and time.monotonic() < deadline:
        missing = [query for query in missing if not prometheus.query(query.expr)]
        if missing:
            time.sleep(1.0)
    assert not missing, "dashboard queries without data:\n" + "\n".join(
        f"  {query.where}: {query.expr}" for query in missing
    )

    # The drift reached the scorer: before it the simulator always sends a
    # price, after it 20 % of its requests lack one.
    missing = prometheus.query('max(octr_scorer_feature_missing_ratio{feature="price"}) > 0.1')
    assert missing, "the scorer did not see the price feature go missing after the drift"
