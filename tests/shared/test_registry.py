"""The model registry against a real Redis server: versions, retention, announcements."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from shared.clock import ManualClock
from shared.errors import ConfigError, SnapshotError
from shared.learn.models import build_model
from shared.registry import Announcement, ModelRegistry
from shared.snapshots import ModelBundle, SigningKeys

pytestmark = pytest.mark.integration

SECRET = "registry-test-secret-" + "0" * 32
ANNOUNCEMENT_TIMEOUT_S = 2.0


@pytest.fixture
def keys() -> SigningKeys:
    return SigningKeys.parse(f"k1:{SECRET}", "k1")


@pytest.fixture
def namespace(unique_name: str) -> str:
    return f"{unique_name}:models"


@pytest.fixture
def registry(redis_client: redis.Redis, keys: SigningKeys, namespace: str) -> ModelRegistry:
    return ModelRegistry(redis_client, keys, namespace=namespace, retain=3)


def bundle(model_name: str = "champion", clicks: int = 1) -> ModelBundle:
    result = ModelBundle(build_model("logreg"), build_model("prior"), model_name)
    for index in range(20):
        label = index < clicks
        result.model.learn_one({"item_id": f"item-{index % 4}"}, label)
        result.baseline.learn_one({}, label)
    return result


def test_versions_increase(registry):
    published = [registry.publish(bundle(), examples_seen=n * 100) for n in range(1, 4)]

    assert [metadata.version for metadata in published] == [1, 2, 3]
    assert registry.versions("champion") == [1, 2, 3]
    assert registry.latest_version("champion") == 3


def test_publish_records_metadata(redis_client, keys, namespace):
    clock = ManualClock(start=1_733_313_600.0)
    registry = ModelRegistry(redis_client, keys, namespace=namespace, clock=clock)

    metadata = registry.publish(bundle(), examples_seen=250, metrics={"log_loss": 0.1, "auc": None})

    assert metadata.examples_seen == 250
    assert metadata.metrics == {"log_loss": 0.1, "auc": None}
    assert metadata.created_at.timestamp() == 1_733_313_600.0
    assert metadata.key_id == "k1"


def test_retention_keeps_newest_and_deletes_blobs(registry, redis_client):
    for _ in range(5):
        registry.publish(bundle(), examples_seen=1)
    model_keys = registry.keys_for("champion")

    assert registry.versions("champion") == [3, 4, 5]
    for version in (1, 2):
        assert redis_client.exists(model_keys.blob(version)) == 0
        assert registry.fetch("champion", version) is None
    for version in (3, 4, 5):
        assert registry.fetch("champion", version) is not None


def test_announcement_received_within_2s(registry):
    with registry.subscribe() as subscription:
        started = time.monotonic()
        registry.publish(bundle(), examples_seen=1)
        announcement = subscription.get(timeout_s=ANNOUNCEMENT_TIMEOUT_S)
        elapsed = time.monotonic() - started

    assert announcement == Announcement(model_name="champion", version=1)
    assert elapsed < ANNOUNCEMENT_TIMEOUT_S


def test_announcement_from_other_thread(registry):
    with registry.subscribe() as subscription:
        publisher = threading.Thread(
            target=lambda: registry.publish(bundle("challenger"), examples_seen=1)
        )
        publisher.start()
        announcement = subscription.get(timeout_s=ANNOUNCEMENT_TIMEOUT_S)
        publisher.join(timeout=ANNOUNCEMENT_TIMEOUT_S)

    assert announcement == Announcement(model_name="challenger", version=1)


def test_announcement_wait_times_out(registry):
    with registry.subscribe() as subscription:
        started = time.monotonic()
        announcement = subscription.get(timeout_s=0.2)
        elapsed = time.monotonic() - started

    assert announcement is None
    assert 0.15 <= elapsed < 1.0


def test_invalid_announcement_skipped(registry, redis_client):
    with registry.subscribe() as subscription:
        redis_client.publish(registry.channel, b"not json")
        redis_client.publish(registry.channel, json.dumps({"model_name": "x", "version": 0}))
        registry.publish(bundle(), examples_seen=1)
        announcement = subscription.get(timeout_s=ANNOUNCEMENT_TIMEOUT_S)

    assert announcement == Announcement(model_name="champion", version=1)
    assert subscription.invalid_messages == 2


def test_latest_loads_and_verifies(registry):
    registry.publish(bundle(clicks=0), examples_seen=10)
    registry.publish(bundle(clicks=5), examples_seen=20)

    loaded = registry.load_latest("champion")

    assert loaded is not None
    metadata, served = loaded
    assert metadata.version == 2
    assert metadata.examples_seen == 20
    assert served.score({"item_id": "item-1"}) == bundle(clicks=5).score({"item_id": "item-1"})


def test_load_missing_model_returns_none(registry):
    assert registry.load_latest("never-published") is None
    assert registry.latest_version("never-published") is None
    assert registry.fetch("never-published") is None
    assert registry.versions("never-published") == []


def test_tampered_stored_blob_rejected(registry, redis_client):
    registry.publish(bundle(), examples_seen=1)
    blob_key = registry.keys_for("champion").blob(1)
    blob = bytearray(redis_client.get(blob_key))
    blob[-3] ^= 0x01
    redis_client.set(blob_key, bytes(blob))

    with pytest.raises(SnapshotError, match="signature check failed"):
        registry.load_latest("champion")


def test_blob_copied_between_versions_rejected(registry, redis_client):
    registry.publish(bundle(), examples_seen=1)
    registry.publish(bundle(), examples_seen=2)
    model_keys = registry.keys_for("champion")
    redis_client.set(model_keys.blob(2), redis_client.get(model_keys.blob(1)))

    with pytest.raises(SnapshotError, match="copied between keys"):
        registry.load_latest("champion")


def test_exact_key_names(registry, redis_client, namespace):
    registry.publish(bundle("champion"), examples_seen=1)
    registry.publish(bundle("champion"), examples_seen=2)

    stored = {key.decode() for key in redis_client.scan_iter(match=f"{namespace}:*")}

    assert stored == {
        f"{namespace}:{{champion}}:counter",
        f"{namespace}:{{champion}}:versions",
        f"{namespace}:{{champion}}:blob:1",
        f"{namespace}:{{champion}}:blob:2",
    }
    assert redis_client.type(f"{namespace}:{{champion}}:counter") == b"string"
    assert redis_client.type(f"{namespace}:{{champion}}:versions") == b"zset"
    assert redis_client.type(f"{namespace}:{{champion}}:blob:1") == b"string"
    for key in stored:
        assert redis_client.ttl(key) == -1
    assert registry.channel == f"{namespace}:announce"


def test_default_namespace_names(redis_client, keys):
    registry = ModelRegistry(redis_client, keys)
    model_keys = registry.keys_for("champion")

    assert model_keys.counter == "octr:models:{champion}:counter"
    assert model_keys.versions == "octr:models:{champion}:versions"
    assert model_keys.blob(7) == "octr:models:{champion}:blob:7"
    assert registry.channel == "octr:models:announce"


def test_model_names_independent(registry):
    for _ in range(4):
        registry.publish(bundle("champion"), examples_seen=1)
    registry.publish(bundle("challenger"), examples_seen=1)

    champion = registry.load_latest("champion")
    challenger = registry.load_latest("challenger")

    assert registry.versions("champion") == [2, 3, 4]
    assert registry.versions("challenger") == [1]
    assert champion is not None and champion[0].model_name == "champion"
    assert challenger is not None and challenger[0].model_name == "challenger"
    assert challenger[0].version == 1


def test_reader_without_keys(redis_client, registry, namespace):
    registry.publish(bundle(), examples_seen=1)
    reader = ModelRegistry(redis_client, None, namespace=namespace)

    assert reader.latest_version("champion") == 1
    assert reader.fetch("champion") == registry.fetch("champion", 1)
    with pytest.raises(ConfigError, match="signing keys"):
        reader.load_latest("champion")
    with pytest.raises(ConfigError, match="signing keys"):
        reader.publish(bundle(), examples_seen=1)


def test_reader_with_other_keys_rejects(redis_client, registry, namespace):
    registry.publish(bundle(), examples_seen=1)
    other_keys = SigningKeys.parse("k9:" + "9" * 40, "k9")
    reader = ModelRegistry(redis_client, other_keys, namespace=namespace)

    with pytest.raises(SnapshotError, match="unknown signing key"):
        reader.load_latest("champion")


@pytest.mark.parametrize("model_name", ["", "has space", "a:b", "{tag}", "x" * 65])
def test_invalid_model_name_rejected(registry, model_name):
    with pytest.raises(ConfigError, match="invalid model name"):
        registry.keys_for(model_name)


def test_invalid_settings_rejected(redis_client, keys, redis_server):
    with pytest.raises(ConfigError, match="retention"):
        ModelRegistry(redis_client, keys, retain=0)
    with pytest.raises(ConfigError, match="namespace"):
        ModelRegistry(redis_client, keys, namespace="bad{ns}")
    decoding = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with pytest.raises(ConfigError, match="decode_responses"):
            ModelRegistry(decoding, keys)
    finally:
        decoding.close()
