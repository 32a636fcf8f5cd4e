"""RedisJoinStore against a real Redis server: the store contract, the key layout and its TTLs."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.errors import ConfigError, OnlineCtrError
from shared.events import Impression, ServedScore
from shared.join.redis_store import RedisJoinStore
from shared.join.store import ChangeSet, HeldClick, ImpressionRecord, RecordState
from shared.localstack import RedisServer, find_free_port
from tests.shared.join.store_contract import JoinStoreContract, example, impression, pending

pytestmark = pytest.mark.integration

PARTITION = 3
LAYOUT_NAMESPACE = "octr:join"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture
def store(client: redis.Redis, unique_name: str) -> RedisJoinStore:
    return RedisJoinStore(client, namespace=f"test:{unique_name}")


def commit_touching_every_key(store: RedisJoinStore, partition: int) -> None:
    change = ChangeSet(
        max_event_time=100.0,
        upserts={"a": pending("a", 0.0, 600.0)},
        held_upserts={"b": HeldClick(90.0, 90.0)},
        emitted=[example("c")],
    )
    store.commit(partition, change)


class TestRedisJoinStore(JoinStoreContract):
    pass


def test_key_layout_of_partition_3(client: redis.Redis) -> None:
    store = RedisJoinStore(client, namespace=LAYOUT_NAMESPACE)
    keys = store.keys_of(PARTITION)
    # The layout namespace is shared with anything else on the server, so start clean.
    client.delete(*keys)

    try:
        commit_touching_every_key(store, PARTITION)

        assert sorted(client.keys(b"octr:join:{p3}:*")) == [
            b"octr:join:{p3}:held",
            b"octr:join:{p3}:meta",
            b"octr:join:{p3}:outbox",
            b"octr:join:{p3}:outbox_order",
            b"octr:join:{p3}:records",
            b"octr:join:{p3}:timers",
        ]
        assert keys == [
            "octr:join:{p3}:meta",
            "octr:join:{p3}:records",
            "octr:join:{p3}:held",
            "octr:join:{p3}:timers",
            "octr:join:{p3}:outbox",
            "octr:join:{p3}:outbox_order",
        ]
        types = {key: client.type(key) for key in keys}
        assert types == {
            "octr:join:{p3}:meta": b"hash",
            "octr:join:{p3}:records": b"hash",
            "octr:join:{p3}:held": b"hash",
            "octr:join:{p3}:timers": b"zset",
            "octr:join:{p3}:outbox": b"hash",
            "octr:join:{p3}:outbox_order": b"zset",
        }
    finally:
        client.delete(*keys)


def test_key_contents_are_pinned(client: redis.Redis, store: RedisJoinStore) -> None:
    commit_touching_every_key(store, PARTITION)
    meta, records, held, timers, outbox, outbox_order = store.keys_of(PARTITION)

    assert client.hgetall(meta) == {
        b"max_event_time": b"100.0",
        b"pending": b"1",
        b"outbox_seq": b"1",
    }
    # State, timer, then the impression's JSON without type, schema_version and impression_id.
    assert client.hget(records, "a") == (
        b'0 600.0 {"event_time":"1970-01-01T00:00:00Z","user_id":"user-1",'
        b'"item_id":"item-1","features":{"ad":"a"}}'
    )
    assert client.hgetall(held) == {b"b": b"90.0 90.0"}
    assert client.zrange(timers, 0, -1, withscores=True) == [(b"h:b", 90.0), (b"r:a", 600.0)]
    assert list(client.hgetall(outbox)) == [b"c/window_closed"]
    assert client.zrange(outbox_order, 0, -1, withscores=True) == [(b"c/window_closed", 1.0)]


def test_every_key_has_ttl_after_commits(client: redis.Redis, store: RedisJoinStore) -> None:
    commit_touching_every_key(store, PARTITION)
    store.commit(PARTITION, ChangeSet(max_event_time=200.0, deletes={"a"}))
    store.acknowledge(PARTITION, ["c/window_closed"])
    store.commit(PARTITION, ChangeSet(max_event_time=300.0, emitted=[example("d")]))

    existing = [key for key in store.keys_of(PARTITION) if client.exists(key)]
    assert len(existing) == 5
    for key in existing:
        ttl = client.ttl(key)
        assert 0 < ttl <= store.safety_ttl_seconds, (key, ttl)


def test_commit_refreshes_safety_ttl(client: redis.Redis, unique_name: str) -> None:
    store = RedisJoinStore(client, namespace=f"test:{unique_name}", safety_ttl_seconds=1000)
    commit_touching_every_key(store, PARTITION)
    records = store.keys_of(PARTITION)[1]
    client.expire(records, 5)

    store.commit(PARTITION, ChangeSet(max_event_time=101.0))

    assert client.ttl(records) > 5


def test_state_survives_new_store_object(
    client: redis.Redis, redis_server: RedisServer, unique_name: str
) -> None:
    namespace = f"test:{unique_name}"
    first = RedisJoinStore(client, namespace=namespace)
    commit_touching_every_key(first, PARTITION)

    # A new client and store, as after a joiner restart.
    new_client = redis.Redis.from_url(redis_server.url)
    second = RedisJoinStore(new_client, namespace=namespace)
    state = second.load(PARTITION, ["a", "b"], 100.0, 60.0)

    assert state.max_event_time == 100.0
    assert state.records == {"a": pending("a", 0.0, 600.0)}
    assert state.held_clicks == {"b": HeldClick(90.0, 90.0)}
    assert second.pending_count(PARTITION) == 1
    assert second.outbox(PARTITION) == [example("c")]
    assert second.record_count(PARTITION) == 1
    assert second.held_click_count(PARTITION) == 1
    new_client.close()


def test_script_cache_flush_is_recovered(client: redis.Redis, store: RedisJoinStore) -> None:
    commit_touching_every_key(store, PARTITION)
    client.script_flush()

    store.commit(PARTITION, ChangeSet(max_event_time=120.0))

    assert store.load(PARTITION, ["a"], 120.0, 60.0).max_event_time == 120.0


@pytest.mark.parametrize("value", [1e-7, 1700000000.123456, -0.0, 0.1 + 0.2, 1e12 + 0.5])
def test_awkward_floats_round_trip(store: RedisJoinStore, value: float) -> None:
    record = ImpressionRecord(impression("a", 0.0, price=value), RecordState.PENDING, value)
    change = ChangeSet(
        max_event_time=value,
        upserts={"a": record},
        held_upserts={"b": HeldClick(value, value)},
    )
    store.commit(0, change)

    state = store.load(0, ["a", "b"], value, 0.0)

    assert math.copysign(1.0, store.max_event_time(0)) == math.copysign(1.0, value)
    assert store.max_event_time(0) == value
    assert state.max_event_time == value
    assert state.records["a"].timer == value
    assert math.copysign(1.0, state.records["a"].timer) == math.copysign(1.0, value)
    assert state.records["a"].impression.features["price"] == value
    assert state.held_clicks["b"] == HeldClick(value, value)


@pytest.mark.parametrize("max_event_time", [1700000000.123456, 1e-7, 0.3])
def test_watermark_is_exact_at_one_ulp(store: RedisJoinStore, max_event_time: float) -> None:
    lateness = 60.0
    watermark = max_event_time - lateness
    above = math.nextafter(watermark, math.inf)
    change = ChangeSet(
        max_event_time=max_event_time,
        upserts={"at": pending("at", 0.0, watermark), "above": pending("above", 0.0, above)},
    )
    store.commit(0, change)

    # The stored maximum decides the watermark, so Lua computes it.
    due = store.load(0, [], 0.0, lateness).records

    assert set(due) == {"at"}


def test_infinite_batch_maximum_releases_everything(store: RedisJoinStore) -> None:
    change = ChangeSet(
        max_event_time=0.0,
        upserts={"a": pending("a", 0.0, 1e15)},
        held_upserts={"b": HeldClick(1e15, 1e15)},
    )
    store.commit(0, change)

    state = store.load(0, [], math.inf, 60.0)

    assert set(state.records) == {"a"}
    assert set(state.held_clicks) == {"b"}


def test_impression_fields_round_trip(store: RedisJoinStore) -> None:
    served = ServedScore(model_version="m-1", arm="challenger", probability=0.25)
    full = Impression(
        impression_id="id:with:colons/ünï",
        event_time=1700000000.123456,
        user_id=None,
        item_id="item-ü",
        features={"text": "naïve \u2603", "empty": "", "zero": 0, "neg": -1.5},
        served=served,
    )
    record = ImpressionRecord(full, RecordState.LATE_HANDLED, 1e12)
    store.commit(0, ChangeSet(max_event_time=0.0, upserts={full.impression_id: record}))

    loaded = store.load(0, [full.impression_id], 0.0, 0.0).records[full.impression_id]

    assert loaded == record
    assert loaded.impression.model_dump() == full.model_dump()


def test_pending_count_follows_state_changes(store: RedisJoinStore) -> None:
    store.commit(0, ChangeSet(max_event_time=0.0, upserts={"a": pending("a", 0.0, 600.0)}))
    store.commit(0, ChangeSet(max_event_time=0.0, upserts={"b": pending("b", 0.0, 600.0)}))
    assert store.pending_count(0) == 2

    # Rewriting a pending record as pending must not count it twice.
    store.commit(0, ChangeSet(max_event_time=0.0, upserts={"a": pending("a", 0.0, 700.0)}))
    assert store.pending_count(0) == 2

    closed = ImpressionRecord(impression("b", 0.0), RecordState.CLOSED, 1200.0)
    store.commit(0, ChangeSet(max_event_time=0.0, upserts={"b": closed}))
    assert store.pending_count(0) == 1

    store.commit(0, ChangeSet(max_event_time=0.0, deletes={"a", "b", "never-stored"}))
    assert store.pending_count(0) == 0
    assert store.record_count(0) == 0


def test_none_max_event_time_clears_it(store: RedisJoinStore) -> None:
    store.commit(0, ChangeSet(max_event_time=5.0))

    store.commit(0, ChangeSet(max_event_time=None))

    assert store.max_event_time(0) is None


def test_namespaces_are_isolated(client: redis.Redis, unique_name: str) -> None:
    first = RedisJoinStore(client, namespace=f"test:{unique_name}:first")
    second = RedisJoinStore(client, namespace=f"test:{unique_name}:second")

    commit_touching_every_key(first, 0)

    assert second.load(0, ["a", "b"], 1e9, 0.0).records == {}
    assert second.max_event_time(0) is None
    assert second.outbox(0) == []


def test_client_decoding_responses_works(redis_server: RedisServer, unique_name: str) -> None:
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    store = RedisJoinStore(client, namespace=f"test:{unique_name}")
    try:
        commit_touching_every_key(store, 0)

        state = store.load(0, ["a", "b"], 100.0, 60.0)

        assert state.records == {"a": pending("a", 0.0, 600.0)}
        assert state.held_clicks == {"b": HeldClick(90.0, 90.0)}
        assert store.outbox(0) == [example("c")]
    finally:
        client.close()


def test_corrupt_record_names_key_and_field(client: redis.Redis, store: RedisJoinStore) -> None:
    commit_touching_every_key(store, PARTITION)
    records = store.keys_of(PARTITION)[1]
    client.hset(records, "a", b"0 600.0 {not json")

    with pytest.raises(OnlineCtrError) as caught:
        store.load(PARTITION, ["a"], 100.0, 60.0)

    message = str(caught.value)
    assert repr(records) in message
    assert "'a'" in message
    assert "HDEL" in message


def test_corrupt_record_header_is_reported(client: redis.Redis, store: RedisJoinStore) -> None:
    commit_touching_every_key(store, PARTITION)
    client.hset(store.keys_of(PARTITION)[1], "a", b"9 600.0 {}")

    with pytest.raises(OnlineCtrError, match="invalid header"):
        store.load(PARTITION, ["a"], 100.0, 60.0)


def test_connection_error_propagates(unique_name: str) -> None:
    # Nothing listens on a port that was free a moment ago. No retries keep the test fast.
    client = redis.Redis(
        host="127.0.0.1",
        port=find_free_port(),
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
    )
    store = RedisJoinStore(client, namespace=f"test:{unique_name}")

    with pytest.raises(redis.ConnectionError):
        store.load(0, ["a"], 0.0, 60.0)
    with pytest.raises(redis.ConnectionError):
        store.commit(0, ChangeSet(max_event_time=0.0))


@pytest.mark.parametrize("namespace", ["", "octr:{join}", "a}b"])
def test_invalid_namespace_rejected(client: redis.Redis, namespace: str) -> None:
    with pytest.raises(ConfigError, match="namespace"):
        RedisJoinStore(client, namespace=namespace)


@pytest.mark.parametrize("ttl", [0, -1, 1.5, True])
def test_invalid_safety_ttl_rejected(client: redis.Redis, ttl: object) -> None:
    with pytest.raises(ConfigError, match="safety_ttl_seconds"):
        RedisJoinStore(client, safety_ttl_seconds=ttl)  # type: ignore[arg-type]


@pytest.mark.parametrize("partition", [-1, True, "3"])
def test_invalid_partition_rejected(store: RedisJoinStore, partition: object) -> None:
    with pytest.raises(ValueError, match="partition"):
        store.keys_of(partition)  # type: ignore[arg-type]
