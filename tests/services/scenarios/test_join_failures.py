"""Field failure classes of the join, as tests: crashes, quiet streams, key expiry, replay state.

Conventions of these scenarios: event time in seconds from 0, window W = 600 s,
allowed lateness L = 60 s, late clicks dropped, features {"ad": "a"}.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from kafka import KafkaProducer

from shared.events import Click, Impression, encode
from shared.join import JoinOutcome, JoinSettings, JoinStateMachine
from shared.join.redis_store import RedisJoinStore
from shared.learn.learner import OnlineLearner
from shared.registry import ModelRegistry
from shared.replay.runner import Replay, ReplayConfig
from shared.snapshots import ModelBundle, SigningKeys
from tests.services.conftest import SIGNING_KEY, wait_until
from tests.services.joiner.test_joiner_live import ExampleReader
from tests.services.test_pipeline_live import learned_labels

pytestmark = pytest.mark.integration

REPO = Path(__file__).parents[3]


def impression(impression_id: str, event_time: float) -> Impression:
    return Impression(
        impression_id=impression_id, event_time=event_time, item_id="a", features={"ad": "a"}
    )


def click(impression_id: str, event_time: float) -> Click:
    return Click(impression_id=impression_id, event_time=event_time)


def send(bootstrap: str, env: dict[str, str], events) -> None:
    """Produce events one by one, in order, each acknowledged before the next."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for event in events:
        topic = env[
            "ONLINE_CTR_TOPIC_IMPRESSIONS"
            if event.type == "impression"
            else "ONLINE_CTR_TOPIC_CLICKS"
        ]
        producer.send(
            topic,
            key=event.impression_id.encode(),
            value=encode(event),
            timestamp_ms=int(event.ts * 1000),
        )
        producer.flush()
    producer.close()


def metric(port: str, name: str) -> float | None:
    """Return the sum of a metric's samples, or None while the endpoint is not up."""
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


@pytest.fixture
def scenario_env(pipeline_env: dict[str, str], unique_name: str) -> dict[str, str]:
    return {
        **pipeline_env,
        "ONLINE_CTR_SIGNING_KEYS": SIGNING_KEY,
        "ONLINE_CTR_SIGNING_KEY_ID": "k1",
        "ONLINE_CTR_REGISTRY_NAMESPACE": f"{unique_name}:models",
        "ONLINE_CTR_DEDUP_NAMESPACE": f"{unique_name}:trainer",
        "ONLINE_CTR_SNAPSHOT_EVERY_SECONDS": "1",
        "ONLINE_CTR_MIN_EVENT_TIME": "1970-01-01T00:00:00Z",
    }


@pytest.mark.parametrize("crash_point", ["before-deliver", "before-commit"])
def test_crash_between_processing_and_commit(
    crash_point, scenario_env, start_service, kafka_broker, redis_client, tmp_path
) -> None:
    env = dict(scenario_env)
    if "ONLINE_CTR_MIN_EVENT_TIME" not in _joiner_fields():
        env.pop("ONLINE_CTR_MIN_EVENT_TIME")
    send(kafka_broker.bootstrap, env, [impression("i1", 0), impression("i2", 10), click("i1", 20)])

    # A brand-new group: the crash comes before its first commit.
    crashing = subprocess.Popen(
        [sys.executable, "-m", "tests.services.scenarios.crashing_joiner", crash_point],
        env=env,
        cwd=REPO,
        stdout=open(tmp_path / "crashing.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    assert crashing.wait(60) == -9, (tmp_path / "crashing.log").read_text()

    joiner = start_service(["joiner"], env, name="joiner")
    trainer = start_service(["trainer"], env, name="trainer")
    send(kafka_broker.bootstrap, env, [impression("i3", 700)])
    namespace = env["ONLINE_CTR_DEDUP_NAMESPACE"]
    wait_until(
        lambda: learned_labels(redis_client, namespace) >= {("i1", 1), ("i2", 0)},
        timeout=90,
        message="the restarted joiner did not deliver both labels",
        services=(joiner, trainer),
    )
    time.sleep(3)

    assert learned_labels(redis_client, namespace) == {("i1", 1), ("i2", 0)}
    reader = ExampleReader(kafka_broker.bootstrap, env["ONLINE_CTR_TOPIC_EXAMPLES"])
    reader.poll()
    reader.poll()
    assert sorted(set(reader.examples)) == [("i1", 1, "click"), ("i2", 0, "window_closed")]
    assert trainer.stop() == 0, trainer.log()
    assert joiner.stop() == 0, joiner.log()


def test_rebalance_while_member_stalled(
    scenario_env, start_service, kafka_broker, redis_client, tmp_path
) -> None:
    env = {
        **scenario_env,
        "ONLINE_CTR_MAX_POLL_INTERVAL_MS": "6000",
        "ONLINE_CTR_SESSION_TIMEOUT_MS": "3000",
        "ONLINE_CTR_HEARTBEAT_INTERVAL_MS": "500",
        "STALL_SECONDS": "12",
    }
    if "ONLINE_CTR_MIN_EVENT_TIME" not in _joiner_fields():
        env.pop("ONLINE_CTR_MIN_EVENT_TIME")

    def stalling_joiner(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.services.scenarios.crashing_joiner",
                "stall-before-commit",
            ],
            env={**env, "ONLINE_CTR_METRICS_PORT": "0"},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    members = [stalling_joiner("member-a"), stalling_joiner("member-b")]
    try:
        logs = [tmp_path / "member-a.log", tmp_path / "member-b.log"]
        wait_until(
            lambda: all("Partitions assigned: [" in log.read_text() for log in logs),
            timeout=60,
            message="both members did not join",
        )
        started = time.monotonic()
        send(kafka_broker.bootstrap, env, [impression("i1", 0), click("i1", 10)])
        trainer = start_service(["trainer"], env, name="trainer")
        namespace = env["ONLINE_CTR_DEDUP_NAMESPACE"]
        wait_until(
            lambda: ("i1", 1) in learned_labels(redis_client, namespace),
            timeout=60,
            message="(i1, 1) never reached learning",
            services=(trainer,),
        )
        # Let the stall pass, the stalled member fail its commit and rejoin.
        wait_until(
            lambda: any("Offset commit failed" in log.read_text() for log in logs),
            timeout=60,
            message="the stalled member never reported its failed commit",
        )
        time.sleep(8)

        assert all(member.poll() is None for member in members), [log.read_text() for log in logs]
        assert learned_labels(redis_client, namespace) == {("i1", 1)}
        reader = ExampleReader(kafka_broker.bootstrap, env["ONLINE_CTR_TOPIC_EXAMPLES"])
        reader.poll()
        reader.poll()
        assert [e for e in reader.examples if e[0] == "i1"] == [("i1", 1, "click")] * len(
            [e for e in reader.examples if e[0] == "i1"]
        )
        # No rebalance loop: after the first assignment, each member is
        # assigned again at most 3 times within the two minutes.
        assert time.monotonic() - started < 120
        for log in logs:
            assert log.read_text().count("Partitions assigned: [") <= 4, log.read_text()
    finally:
        for member in members:
            member.kill()
            member.wait(5)


def _joiner_fields() -> set[str]:
    from services.joiner.settings import JoinerSettings

    return {f"ONLINE_CTR_{name.upper()}" for name in JoinerSettings.model_fields}


def test_quiet_stream_closes_by_idle_timeout(scenario_env, start_service, kafka_broker) -> None:
    env = {**scenario_env, "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "6"}
    if "ONLINE_CTR_MIN_EVENT_TIME" not in _joiner_fields():
        env.pop("ONLINE_CTR_MIN_EVENT_TIME")
    joiner = start_service(["joiner"], env, name="joiner")
    port = env.get("ONLINE_CTR_METRICS_PORT") or joiner.env["ONLINE_CTR_METRICS_PORT"]
    send(kafka_broker.bootstrap, env, [impression("i1", 0)])

    # Before the idle timeout, the stall is visible in the metrics.
    wait_until(
        lambda: metric(port, "octr_joiner_pending_impressions") == 1,
        timeout=60,
        message="the pending impression never showed",
        services=(joiner,),
    )
    assert metric(port, "octr_joiner_watermark_lag_seconds") > 1e9

    reader = ExampleReader(kafka_broker.bootstrap, env["ONLINE_CTR_TOPIC_EXAMPLES"])
    wait_until(
        lambda: reader.poll() >= 1, timeout=60, message="i1 never closed", services=(joiner,)
    )
    time.sleep(2)
    reader.poll()

    assert reader.examples == [("i1", 0, "window_closed")]
    assert metric(port, "octr_joiner_pending_impressions") == 0


def test_quiet_partition_closes_after_restart(scenario_env, start_service, kafka_broker) -> None:
    # The restarted joiner reads no record of the partition, because the first
    # one committed everything before it stopped.
    env = dict(scenario_env)
    if "ONLINE_CTR_MIN_EVENT_TIME" not in _joiner_fields():
        env.pop("ONLINE_CTR_MIN_EVENT_TIME")
    first = start_service(["joiner"], env, name="joiner")
    port = first.env["ONLINE_CTR_METRICS_PORT"]
    send(kafka_broker.bootstrap, env, [impression("i1", 0)])
    wait_until(
        lambda: metric(port, "octr_joiner_pending_impressions") == 1,
        timeout=60,
        message="the pending impression never showed",
        services=(first,),
    )
    assert first.stop() == 0, first.log()

    second = start_service(
        ["joiner"], {**env, "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "2"}, name="joiner"
    )
    reader = ExampleReader(kafka_broker.bootstrap, env["ONLINE_CTR_TOPIC_EXAMPLES"])
    wait_until(
        lambda: reader.poll() >= 1,
        timeout=60,
        message="the restarted joiner never closed i1's window",
        services=(second,),
    )

    assert reader.examples == [("i1", 0, "window_closed")]
    assert second.stop() == 0, second.log()


def test_every_joiner_key_expires(redis_client: redis.Redis, unique_name: str) -> None:
    store = RedisJoinStore(redis_client, namespace=f"{unique_name}:join")
    machine = JoinStateMachine(store, JoinSettings())
    emitted, duplicates = [], 0

    def step(*events):
        nonlocal duplicates
        result = machine.process(0, list(events))
        store.acknowledge(0, [e.dedup_key for e in result.examples])
        emitted.extend((e.impression.impression_id, e.label) for e in result.examples)
        duplicates += result.counts[JoinOutcome.CLICK_DUPLICATE]
        existing = [key for key in store.keys_of(0) if redis_client.exists(key)]
        for key in existing:
            ttl = redis_client.ttl(key)
            assert ttl > 0, f"{key} has TTL {ttl}"
        return len(existing)

    starting_count = step(impression("i1", 0))
    step(click("i1", 10))
    step(click("i1", 12))
    step(impression("i2", 700))
    assert emitted == [("i1", 1)]
    assert duplicates == 1

    final_count = step(impression("i9", 1400))

    assert emitted == [("i1", 1), ("i2", 0)]
    assert final_count == starting_count
    # Only i2's decided record (kept to recognise late clicks) and the open i9 remain.
    assert store.record_count(0) == 2


def test_replay_from_snapshot_twice_is_identical(redis_client, unique_name, tmp_path) -> None:
    keys = SigningKeys.parse(SIGNING_KEY, "k1")
    registry = ModelRegistry(redis_client, keys, namespace=f"{unique_name}:models")
    learner = OnlineLearner()
    trained = learner.model
    for n in range(300):
        x = {"item_id": f"item{n % 7}", "ad": "a"}
        trained.learn_one(x, n % 5 == 0)
    registry.publish(
        ModelBundle(model=trained, baseline=learner.baseline, model_name="champion"),
        examples_seen=300,
    )
    version_before = registry.latest_version("champion")
    blob_before = registry.fetch("champion")

    events = []
    for n in range(500):
        events.append(impression(f"i{n}", n * 5.0))
        if n % 6 == 0:
            events.append(click(f"i{n}", n * 5.0 + 30))

    def replay_once():
        _, bundle = registry.load_latest("champion")
        labels = []
        result = Replay(
            ReplayConfig(events=Path("unused")),
            on_example=lambda e: labels.append((e.impression.impression_id, e.label)),
            initial_bundle=bundle,
        ).replay(events)
        return labels, result.evaluation.report(), result.timeline

    first, second = replay_once(), replay_once()

    assert first == second
    assert registry.latest_version("champion") == version_before
    assert registry.fetch("champion") == blob_before


def test_replay_leaves_initial_bundle_unchanged(tmp_path) -> None:
    learner = OnlineLearner()
    bundle = ModelBundle(model=learner.model, baseline=learner.baseline, model_name="champion")
    events = [impression(f"i{n}", n * 5.0) for n in range(300)]
    events += [click(f"i{n}", n * 5.0 + 1) for n in range(0, 300, 7)]
    events.sort(key=lambda event: event.ts)

    reports = [
        Replay(ReplayConfig(events=Path("unused")), initial_bundle=bundle)
        .replay(events)
        .evaluation.report()
        for _ in range(2)
    ]

    assert reports[0] == reports[1]
