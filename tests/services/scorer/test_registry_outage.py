"""A real scorer process whose model registry, a Redis server of its own, stops and comes back.

The test starts its own ``redis-server`` so that stopping it leaves the
session's server to the other tests. It prints how long the scorer took to
notice the outage and to serve a version published after Redis returned.
"""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from shared.localstack import RedisServer
from shared.registry import ModelRegistry
from tests.services.conftest import wait_until
from tests.services.scorer.conftest import KEYS, is_ready, scorer_process_env, trained_bundle
from tests.services.scorer.test_scorer_live import metric_value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAMESPACE = "outage:models"
START_TIMEOUT_S = 30.0
# The scorer notices a closed connection on its next read of the subscription.
DETECT_TIMEOUT_S = 5.0
# The reloader's back-off grows to 10 s between attempts, and it polls the
# registry as soon as it has subscribed again.
RECOVER_TIMEOUT_S = 20.0
# Requests sent while Redis is down: one every OUTAGE_REQUEST_INTERVAL_S, so
# the outage lasts about 15 s and the back-off reaches its 10 s maximum.
OUTAGE_REQUESTS = 150
OUTAGE_REQUEST_INTERVAL_S = 0.1
REQUESTS = [
    {"item_id": f"item-{index % 7}", "features": {"position": index % 4}, "log_impression": False}
    for index in range(6)
]
READY = "octr_scorer_ready "
LAST_SUCCESS = "octr_scorer_registry_last_success_timestamp_seconds "
UNAVAILABLE = 'octr_scorer_model_reload_failures_total{arm="champion",reason="unavailable"}'


def publish(server: RedisServer, seed: int) -> None:
    client = redis.Redis.from_url(server.url)
    try:
        ModelRegistry(client, KEYS, namespace=NAMESPACE).publish(
            trained_bundle(seed=seed), examples_seen=seed
        )
    finally:
        client.close()


def score_all(client: httpx.Client) -> list[dict]:
    results = []
    for body in REQUESTS:
        response = client.post("/v1/score", json=body)
        assert response.status_code == 200, response.text
        results.append(response.json())
    return results


def probabilities(results: list[dict]) -> list[float]:
    return [result["probability"] for result in results]


def offline_probabilities(seed: int) -> list[float]:
    bundle = trained_bundle(seed=seed)
    return [bundle.score({"item_id": body["item_id"], **body["features"]})[0] for body in REQUESTS]


def registry_status(client: httpx.Client) -> dict:
    return client.get("/readyz").json()["registry"]


def test_scorer_serves_through_redis_outage(own_redis, start_service):
    publish(own_redis, seed=1)
    env = scorer_process_env(own_redis.url, NAMESPACE)
    url = f"http://127.0.0.1:{env['ONLINE_CTR_HTTP_PORT']}"
    scorer = start_service(["scorer"], env, name="scorer")
    wait_until(
        lambda: is_ready(url),
        timeout=START_TIMEOUT_S,
        message="the scorer did not start",
        services=(scorer,),
    )
    client = httpx.Client(base_url=url, timeout=10.0)

    before = score_all(client)
    assert {result["model_version"] for result in before} == {"champion:1"}
    assert probabilities(before) == offline_probabilities(seed=1)
    status = registry_status(client)
    assert status["reachable"] is True
    assert status["error"] is None

    stopping_at = time.monotonic()
    own_redis.stop()
    wait_until(
        lambda: registry_status(client)["reachable"] is False,
        timeout=DETECT_TIMEOUT_S,
        interval=0.05,
        message="/readyz did not report the unreachable registry",
        services=(scorer,),
    )
    detect_seconds = time.monotonic() - stopping_at

    readiness = client.get("/readyz")
    assert readiness.status_code == 200, readiness.text
    body = readiness.json()
    assert body["ready"] is True
    assert body["champion"]["model_version"] == "champion:1"
    assert body["registry"]["reachable"] is False
    assert "Redis unavailable" in body["registry"]["error"]
    assert body["registry"]["seconds_since_last_success"] >= 0.0
    last_success = metric_value(url, LAST_SUCCESS)
    assert last_success > 0.0

    statuses: dict[int, int] = {}
    changed: list[tuple[int, list[float]]] = []
    for index in range(OUTAGE_REQUESTS):
        if index % 10 == 0:
            batch = client.post("/v1/score/batch", json={"requests": REQUESTS})
            statuses[batch.status_code] = statuses.get(batch.status_code, 0) + 1
            if batch.status_code == 200:
                scores = probabilities(batch.json()["results"])
                if scores != probabilities(before):
                    changed.append((index, scores))
        elif index % 10 == 5:
            ready = client.get("/readyz")
            statuses[ready.status_code] = statuses.get(ready.status_code, 0) + 1
        else:
            single = client.post("/v1/score", json=REQUESTS[index % len(REQUESTS)])
            statuses[single.status_code] = statuses.get(single.status_code, 0) + 1
            if single.status_code == 200:
                expected = before[index % len(REQUESTS)]["probability"]
                if single.json()["probability"] != expected:
                    changed.append((index, [single.json()["probability"]]))
        time.sleep(OUTAGE_REQUEST_INTERVAL_S)
    outage_seconds = time.monotonic() - stopping_at

    assert statuses == {200: OUTAGE_REQUESTS}
    assert changed == []
    assert scorer.is_running(), scorer.log()[-3000:]
    during = client.get("/readyz").json()
    assert during["registry"]["reachable"] is False
    assert during["registry"]["seconds_since_last_success"] >= outage_seconds - 1.0
    assert metric_value(url, READY) == 1.0
    assert metric_value(url, LAST_SUCCESS) == last_success
    assert metric_value(url, UNAVAILABLE) >= 2.0

    own_redis.start()
    restarted_at = time.monotonic()
    publish(own_redis, seed=2)
    recovery_statuses: list[int] = []

    def serves_version_2() -> bool:
        response = client.post("/v1/score", json=REQUESTS[0])
        recovery_statuses.append(response.status_code)
        return response.status_code == 200 and response.json()["model_version"] == "champion:2"

    wait_until(
        serves_version_2,
        timeout=RECOVER_TIMEOUT_S,
        interval=0.05,
        message="the scorer did not serve the version published after Redis returned",
        services=(scorer,),
    )
    recover_seconds = time.monotonic() - restarted_at
    assert set(recovery_statuses) == {200}

    after = score_all(client)
    assert {result["model_version"] for result in after} == {"champion:2"}
    assert probabilities(after) == offline_probabilities(seed=2)
    status = registry_status(client)
    assert status["reachable"] is True
    assert status["error"] is None
    assert "Model registry reachable again" in scorer.log()
    print(
        f"outage {outage_seconds:.1f} s: /readyz reported it after {detect_seconds:.2f} s; "
        f"version 2 served {recover_seconds:.2f} s after Redis was ready again"
    )
    client.close()
    assert scorer.stop() == 0, scorer.log()[-3000:]
