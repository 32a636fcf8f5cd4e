"""Loading, verifying and hot-swapping snapshots from a real Redis registry."""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry
from river import compose, linear_model, preprocessing

from services.scorer.app import create_app
from shared import snapshots
from shared.learn.models import build_model
from shared.registry import Announcement, ModelRegistry
from shared.snapshots import ModelBundle, SnapshotMetadata, build_snapshot
from tests.services.conftest import wait_until
from tests.services.scorer.conftest import KEYS, RecordingSink, scorer_settings, trained_bundle

pytestmark = pytest.mark.integration

FEATURES = {"item_id": "item-1", "position": 2}
RELOAD_TIMEOUT_S = 5.0


@pytest.fixture
def namespace(unique_name: str) -> str:
    return f"{unique_name}:models"


@pytest.fixture
def registry(redis_client: redis.Redis, namespace: str) -> ModelRegistry:
    return ModelRegistry(redis_client, KEYS, namespace=namespace)


@pytest.fixture
def metrics_registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def start_scorer(serve, registry, namespace, metrics_registry):
    """Start a scorer that loads from the test's registry namespace."""

    def start(**overrides):
        settings = scorer_settings(
            **{"registry_namespace": namespace, "reload_poll_interval_seconds": 0.5, **overrides}
        )
        app = create_app(
            settings, registry=registry, sink=RecordingSink(), metrics_registry=metrics_registry
        )
        return app, serve(app)

    return start


def store_raw(client: redis.Redis, registry: ModelRegistry, model_name: str, blob: bytes) -> int:
    """Store bytes as the next version of a model and announce it, as a publisher would."""
    keys = registry.keys_for(model_name)
    version = int(client.incr(keys.counter))
    client.set(keys.blob(version), blob)
    client.zadd(keys.versions, {str(version): version})
    announcement = Announcement(model_name=model_name, version=version)
    client.publish(registry.channel, announcement.model_dump_json())
    return version


def signed_blob(bundle: ModelBundle, version: int) -> bytes:
    draft = SnapshotMetadata(
        model_name=bundle.model_name,
        version=version,
        created_at=dt.datetime.now(dt.UTC),
        examples_seen=1,
    )
    return build_snapshot(bundle, draft, KEYS)[1]


def reload_failures(metrics_registry: CollectorRegistry, reason: str, arm: str = "champion"):
    value = metrics_registry.get_sample_value(
        "octr_scorer_model_reload_failures_total", {"arm": arm, "reason": reason}
    )
    return value or 0.0


def served_version(client: httpx.Client) -> str:
    return client.post("/v1/score", json={"item_id": "item-1", "features": {"position": 2}}).json()[
        "model_version"
    ]


def _explode(message: str) -> None:
    raise ValueError(message)


class ExplodesOnLoad:
    """Pickles fine; unpickling it raises, as a class that moved between releases would."""

    def __reduce__(self):
        return (_explode, ("this model cannot be rebuilt",))


def test_newest_snapshot_loaded_at_start(start_scorer, registry, metrics_registry):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    registry.publish(trained_bundle(seed=2), examples_seen=2)

    _, client = start_scorer()

    assert served_version(client) == "champion:2"
    assert metrics_registry.get_sample_value("octr_scorer_model_version", {"arm": "champion"}) == 2
    assert metrics_registry.get_sample_value("octr_scorer_model_reloads_total", {"arm": "champion"})
    assert client.get("/readyz").status_code == 200
    registry_status = client.get("/readyz").json()["registry"]
    assert registry_status["reachable"] is True
    assert registry_status["seconds_since_last_success"] < RELOAD_TIMEOUT_S
    assert registry_status["error"] is None
    last_success = "octr_scorer_registry_last_success_timestamp_seconds"
    assert metrics_registry.get_sample_value(last_success) > 0.0


def test_first_model_served_once_published(start_scorer, registry):
    _, client = start_scorer()
    assert client.post("/v1/score", json={"item_id": "a"}).status_code == 503

    registry.publish(trained_bundle(), examples_seen=1)

    wait_until(
        lambda: client.post("/v1/score", json={"item_id": "a"}).status_code == 200,
        timeout=RELOAD_TIMEOUT_S,
        message="the first snapshot was not served",
    )
    assert client.get("/readyz").status_code == 200


def test_hot_reload_under_concurrent_requests(start_scorer, registry):
    bundles = {1: trained_bundle(seed=1), 2: trained_bundle(seed=2)}
    registry.publish(bundles[1], examples_seen=1)
    _, client = start_scorer(reload_poll_interval_seconds=60)
    expected = {f"champion:{v}": bundle.score(FEATURES)[0] for v, bundle in bundles.items()}
    assert expected["champion:1"] != expected["champion:2"]

    stop = threading.Event()
    responses: list[list[tuple[int, dict]]] = [[] for _ in range(4)]

    def send_requests(results: list[tuple[int, dict]]) -> None:
        with httpx.Client(base_url=str(client.base_url), timeout=5.0) as own:
            for _ in range(20_000):
                if stop.is_set():
                    return
                body = {"item_id": "item-1", "features": {"position": 2}}
                response = own.post("/v1/score", json=body)
                results.append((response.status_code, response.json()))

    threads = [threading.Thread(target=send_requests, args=(r,)) for r in responses]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    published_at = time.monotonic()
    registry.publish(bundles[2], examples_seen=2)
    wait_until(
        lambda: all(r and r[-1][1].get("model_version") == "champion:2" for r in responses),
        timeout=RELOAD_TIMEOUT_S,
        message="version 2 was not served to every thread",
    )
    swap_seconds = time.monotonic() - published_at
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(10)

    everything = [item for results in responses for item in results]
    assert len(everything) >= 20
    assert [status for status, _ in everything if status != 200] == []
    for _, body in everything:
        assert body["probability"] == expected[body["model_version"]], body
    for results in responses:
        versions = [body["model_version"] for _, body in results]
        first_new = versions.index("champion:2")
        assert set(versions[first_new:]) == {"champion:2"}
    assert swap_seconds < RELOAD_TIMEOUT_S


def test_deleted_newest_version_rolls_back(start_scorer, registry, redis_client):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    registry.publish(trained_bundle(seed=2), examples_seen=2)
    _, client = start_scorer()
    assert served_version(client) == "champion:2"

    keys = registry.keys_for("champion")
    redis_client.zrem(keys.versions, "2")
    redis_client.delete(keys.blob(2))

    wait_until(
        lambda: served_version(client) == "champion:1",
        timeout=RELOAD_TIMEOUT_S,
        message="the scorer did not roll back to version 1",
    )


def test_tampered_snapshot_rejected(start_scorer, registry, redis_client, metrics_registry, caplog):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    _, client = start_scorer()
    caplog.set_level(logging.ERROR, logger="services.scorer.models")

    blob = bytearray(signed_blob(trained_bundle(seed=2), version=2))
    blob[-1] ^= 0xFF
    version = store_raw(redis_client, registry, "champion", bytes(blob))

    wait_until(
        lambda: reload_failures(metrics_registry, "verification_failed") == 1,
        timeout=RELOAD_TIMEOUT_S,
        message="the tampered snapshot was not rejected",
    )
    assert version == 2
    assert served_version(client) == "champion:1"
    readiness = client.get("/readyz")
    assert readiness.status_code == 200
    failure = readiness.json()["last_reload_failures"]["champion"]
    assert failure["version"] == 2
    assert failure["reason"] == "verification_failed"
    assert "signature check failed" in failure["message"]
    logged = [record.getMessage() for record in caplog.records]
    assert any("version 2" in line and "key id 'k1'" in line for line in logged), logged


def test_unsigned_snapshot_rejected(start_scorer, registry, redis_client, metrics_registry):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    _, client = start_scorer()

    store_raw(redis_client, registry, "champion", b"garbage that is not a snapshot" * 10)

    wait_until(
        lambda: reload_failures(metrics_registry, "verification_failed") == 1,
        timeout=RELOAD_TIMEOUT_S,
        message="the unsigned snapshot was not rejected",
    )
    assert served_version(client) == "champion:1"
    assert client.get("/readyz").json()["last_reload_failures"]["champion"]["version"] == 2


def test_rejected_version_not_retried(start_scorer, registry, redis_client, metrics_registry):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    _, client = start_scorer(reload_poll_interval_seconds=0.1)

    store_raw(redis_client, registry, "champion", b"garbage that is not a snapshot" * 10)
    wait_until(
        lambda: reload_failures(metrics_registry, "verification_failed") == 1,
        timeout=RELOAD_TIMEOUT_S,
        message="the unsigned snapshot was not rejected",
    )
    time.sleep(1.0)

    assert reload_failures(metrics_registry, "verification_failed") == 1
    registry.publish(trained_bundle(seed=3), examples_seen=3)
    wait_until(
        lambda: served_version(client) == "champion:3",
        timeout=RELOAD_TIMEOUT_S,
        message="the next valid version was not served",
    )
    assert "champion" not in client.get("/readyz").json()["last_reload_failures"]


def test_undeserialisable_snapshot_keeps_previous(start_scorer, registry, metrics_registry):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    _, client = start_scorer()

    broken = ModelBundle(ExplodesOnLoad(), build_model("prior"), "champion")
    registry.publish(broken, examples_seen=2)

    wait_until(
        lambda: reload_failures(metrics_registry, "deserialisation_failed") == 1,
        timeout=RELOAD_TIMEOUT_S,
        message="the undeserialisable snapshot was not counted",
    )
    assert served_version(client) == "champion:1"
    readiness = client.get("/readyz")
    assert readiness.status_code == 200
    failure = readiness.json()["last_reload_failures"]["champion"]
    assert failure["reason"] == "deserialisation_failed"
    assert "this model cannot be rebuilt" in failure["message"]


def test_other_river_version_keeps_previous(
    start_scorer, registry, redis_client, metrics_registry, monkeypatch
):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    _, client = start_scorer()

    with monkeypatch.context() as patch:
        patch.setattr(snapshots, "RIVER_VERSION", "0.1.0")
        blob = signed_blob(trained_bundle(seed=2), version=2)
    store_raw(redis_client, registry, "champion", blob)

    wait_until(
        lambda: reload_failures(metrics_registry, "river_version_mismatch") == 1,
        timeout=RELOAD_TIMEOUT_S,
        message="the snapshot from another River release was not counted",
    )
    assert served_version(client) == "champion:1"
    failure = client.get("/readyz").json()["last_reload_failures"]["champion"]
    assert failure["reason"] == "river_version_mismatch"
    assert "0.1.0" in failure["message"]


def test_copied_snapshot_rejected(start_scorer, registry, redis_client, metrics_registry):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    _, client = start_scorer()

    # A validly signed version 1, stored again as version 2.
    store_raw(redis_client, registry, "champion", registry.fetch("champion", 1))

    wait_until(
        lambda: reload_failures(metrics_registry, "version_mismatch") == 1,
        timeout=RELOAD_TIMEOUT_S,
        message="the copied snapshot was not rejected",
    )
    assert served_version(client) == "champion:1"


def test_challenger_loaded_when_it_gets_traffic(start_scorer, registry):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    registry.publish(trained_bundle(name="challenger", seed=2), examples_seen=1)

    _, client = start_scorer(challenger_share=0.5)

    body = client.get("/readyz").json()
    assert body["champion"]["model_version"] == "champion:1"
    assert body["challenger"]["model_version"] == "challenger:1"


def test_challenger_not_loaded_without_traffic(start_scorer, registry):
    registry.publish(trained_bundle(seed=1), examples_seen=1)
    registry.publish(trained_bundle(name="challenger", seed=2), examples_seen=1)

    _, client = start_scorer()

    assert client.get("/readyz").json()["challenger"] is None


def test_scoring_does_not_change_model(start_scorer, registry):
    rng = random.Random(5)
    model = (
        compose.Select("price") | preprocessing.StandardScaler() | linear_model.LogisticRegression()
    )
    for _ in range(300):
        price = rng.uniform(5.0, 50.0)
        model.learn_one({"item_id": "item-1", "price": price}, price < 20.0)
    registry.publish(ModelBundle(model, build_model("prior"), "champion"), examples_seen=300)
    app, client = start_scorer()
    _, offline = registry.load("champion")
    served_scaler = app.state.holder.models.champion.bundle.model["StandardScaler"]
    stats_before = (
        dict(served_scaler.counts),
        dict(served_scaler.means),
        dict(served_scaler.vars),
    )

    for _ in range(1000):
        response = client.post("/v1/score", json={"item_id": "item-1", "features": {"price": 99.0}})
        assert response.status_code == 200
    last = [
        client.post("/v1/score", json={"item_id": "item-1", "features": {"price": 10.0}}).json()
        for _ in range(2)
    ]

    expected = offline.score({"item_id": "item-1", "price": 10.0})[0]
    assert [result["probability"] for result in last] == [expected, expected]
    stats_after = (
        dict(served_scaler.counts),
        dict(served_scaler.means),
        dict(served_scaler.vars),
    )
    assert stats_after == stats_before
    offline_scaler = offline.model["StandardScaler"]
    assert stats_after == (
        dict(offline_scaler.counts),
        dict(offline_scaler.means),
        dict(offline_scaler.vars),
    )


def test_redis_unavailable_serves_503_and_counts(serve, metrics_registry):
    from shared.localstack import find_free_port

    settings = scorer_settings(redis_url=f"redis://127.0.0.1:{find_free_port()}/0")
    app = create_app(settings, sink=RecordingSink(), metrics_registry=metrics_registry)
    client = serve(app)

    response = client.post("/v1/score", json={"item_id": "a"})

    assert response.status_code == 503
    assert client.get("/readyz").status_code == 503
    wait_until(
        lambda: reload_failures(metrics_registry, "unavailable") >= 1,
        timeout=RELOAD_TIMEOUT_S,
        message="the unreachable registry was not counted",
    )
    registry = client.get("/readyz").json()["registry"]
    assert registry["reachable"] is False
    assert registry["seconds_since_last_success"] is None
    assert "Redis unavailable" in registry["error"]
    assert metrics_registry.get_sample_value("octr_scorer_ready") == 0.0
