"""The scorer as a real ``online-ctr scorer`` process, alone and in the full loop.

The loop: the scorer logs what it served to the impressions topic, the test
clicks some of the served impressions, the joiner labels them, the trainer
learns from them and publishes a new snapshot, and the scorer serves it.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from kafka import KafkaProducer

from shared.events import Click, encode
from shared.localstack import find_free_port
from shared.registry import ModelRegistry
from tests.services.conftest import wait_until
from tests.services.scorer.conftest import KEYS, SIGNING_KEY, trained_bundle
from tests.services.scorer.test_models import signed_blob, store_raw

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FEATURES = {"item_id": "item-1", "position": 2}
START_TIMEOUT_S = 30.0
# One series per live worker: octr_scorer_model_version{arm="champion",pid="123"} 2.0
_WORKER_VERSION = re.compile(
    r'^octr_scorer_model_version\{arm="champion",pid="(\d+)"\} ([0-9.]+)$', re.MULTILINE
)


@pytest.fixture
def scorer_env(pipeline_env: dict[str, str], unique_name: str) -> dict[str, str]:
    return {
        **pipeline_env,
        "ONLINE_CTR_SIGNING_KEYS": SIGNING_KEY,
        "ONLINE_CTR_SIGNING_KEY_ID": "k1",
        "ONLINE_CTR_REGISTRY_NAMESPACE": f"{unique_name}:models",
        "ONLINE_CTR_HTTP_HOST": "127.0.0.1",
        "ONLINE_CTR_HTTP_PORT": str(find_free_port()),
        "ONLINE_CTR_RELOAD_POLL_INTERVAL_SECONDS": "30",
    }


@pytest.fixture
def registry(redis_client, scorer_env) -> ModelRegistry:
    return ModelRegistry(redis_client, KEYS, namespace=scorer_env["ONLINE_CTR_REGISTRY_NAMESPACE"])


def base_url(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['ONLINE_CTR_HTTP_PORT']}"


def score_on_new_connection(url: str) -> httpx.Response:
    # A new connection for each request lets the kernel hand it to either worker.
    with httpx.Client(base_url=url, timeout=10.0) as client:
        return client.post("/v1/score", json={"item_id": "item-1", "features": {"position": 2}})


def worker_versions(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    return {pid: float(version) for pid, version in _WORKER_VERSION.findall(text)}


def metric_value(url: str, line_prefix: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10.0).text
    for line in text.splitlines():
        if line.startswith(line_prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def test_two_workers_swap_and_reject(scorer_env, start_service, registry, redis_client):
    bundles = {1: trained_bundle(seed=1), 2: trained_bundle(seed=2)}
    registry.publish(bundles[1], examples_seen=1)
    env = {**scorer_env, "ONLINE_CTR_WORKERS": "2"}
    url = base_url(env)
    scorer = start_service(["scorer"], env, name="scorer")
    wait_until(
        lambda: ready(url) and len(worker_versions(url)) == 2,
        timeout=START_TIMEOUT_S,
        message="the two scorer workers did not start",
        services=(scorer,),
    )
    offline = {f"champion:{version}": bundles[version].score(FEATURES)[0] for version in bundles}

    with ThreadPoolExecutor(max_workers=20) as pool:
        first = [pool.submit(score_on_new_connection, url) for _ in range(50)]
        registry.publish(bundles[2], examples_seen=2)
        published_at = time.monotonic()
        second = [pool.submit(score_on_new_connection, url) for _ in range(50)]
        wait_until(
            lambda: set(worker_versions(url).values()) == {2.0},
            timeout=5.0,
            message="not every worker serves version 2",
            services=(scorer,),
        )
        swap_seconds = time.monotonic() - published_at
        responses = [future.result() for future in first + second]

    assert swap_seconds < 5.0
    assert [r.status_code for r in responses if r.status_code != 200] == []
    for response in responses:
        body = response.json()
        assert body["probability"] == offline[body["model_version"]], body
    assert {score_on_new_connection(url).json()["model_version"] for _ in range(40)} == {
        "champion:2"
    }

    blob = bytearray(signed_blob(trained_bundle(seed=3), version=3))
    blob[len(blob) // 2] ^= 0xFF
    store_raw(redis_client, registry, "champion", bytes(blob))
    failures = (
        'octr_scorer_model_reload_failures_total{arm="champion",reason="verification_failed"}'
    )
    wait_until(
        lambda: metric_value(url, failures) == 2.0,
        timeout=5.0,
        message="both workers did not reject the tampered version 3",
        services=(scorer,),
    )
    answers = [score_on_new_connection(url) for _ in range(40)]
    assert {r.status_code for r in answers} == {200}
    assert {r.json()["model_version"] for r in answers} == {"champion:2"}
    versions = worker_versions(url)
    assert len(versions) == 2
    assert set(versions.values()) == {2.0}
    assert scorer.stop() == 0, scorer.log()


def test_served_impressions_train_next_model(
    scorer_env, start_service, registry, kafka_broker, unique_name
):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    env = {
        **scorer_env,
        "ONLINE_CTR_WINDOW_SECONDS": "5",
        "ONLINE_CTR_ALLOWED_LATENESS_SECONDS": "1",
        "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "2",
        "ONLINE_CTR_DEDUP_NAMESPACE": f"{unique_name}:trainer",
        "ONLINE_CTR_SNAPSHOT_EVERY_SECONDS": "1",
        "ONLINE_CTR_RELOAD_POLL_INTERVAL_SECONDS": "2",
    }
    url = base_url(env)
    scorer = start_service(["scorer"], env, name="scorer")
    wait_until(
        lambda: ready(url),
        timeout=START_TIMEOUT_S,
        message="the scorer did not start",
        services=(scorer,),
    )

    served = []
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for batch in range(4):
            requests = [
                {
                    "user_id": f"user-{batch}-{index}",
                    "item_id": f"item-{index % 5}",
                    "features": {"position": index % 4},
                }
                for index in range(50)
            ]
            response = client.post("/v1/score/batch", json={"requests": requests})
            assert response.status_code == 200, response.text
            served.extend(response.json()["results"])
    assert {result["model_version"] for result in served} == {"champion:1"}

    clicked = [result["impression_id"] for result in served[::3]]
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    now = dt.datetime.now(dt.UTC)
    for impression_id in clicked:
        click = Click(impression_id=impression_id, event_time=now)
        producer.send(
            env["ONLINE_CTR_TOPIC_CLICKS"], key=impression_id.encode(), value=encode(click)
        )
    producer.flush(10)
    producer.close()

    joiner = start_service(["joiner"], env, name="joiner")
    trainer = start_service(["trainer"], env, name="trainer")
    services = (scorer, joiner, trainer)

    def newest_covers_served() -> bool:
        loaded = registry.load_latest("champion")
        return loaded is not None and loaded[0].examples_seen >= 1 + len(served)

    wait_until(
        newest_covers_served,
        timeout=90,
        message="the trainer did not learn every served impression",
        services=services,
    )
    newest = registry.latest_version("champion")
    wait_until(
        lambda: score_on_new_connection(url).json()["model_version"] == f"champion:{newest}",
        timeout=10,
        message="the scorer did not serve the trainer's new version",
        services=services,
    )
    assert newest is not None and newest > 1
    assert trainer.stop() == 0, trainer.log()
    assert joiner.stop() == 0, joiner.log()
    assert scorer.stop() == 0, scorer.log()
