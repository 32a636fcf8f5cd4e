"""A Redis outage under the live joiner and trainer, and what the append-only file keeps.

Each pipeline test runs its own ``redis-server`` with ``appendonly yes`` and
``appendfsync everysec`` in a temporary directory. It stops the server for
about 10 s while the bundled sample flows through the joiner and trainer, then
starts it again on the same port and directory. The services must keep their
committed offsets still during the outage, log their back-off, go on in the
same processes, and in the end have learned exactly the labels that offline
replay decides.
"""

from __future__ import annotations

import re
import threading
import time

import pytest
import redis
from kafka.admin import KafkaAdminClient

from shared.localstack import RedisServer
from tests.services.conftest import wait_until
from tests.services.joiner.test_joiner_live import SAMPLE, produce, replay_labels
from tests.services.test_pipeline_live import learned_labels, newest_snapshot

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 10.0
# The sample gives 60,000 labels, so Redis goes down with most of them still to come.
LEARNED_BEFORE_OUTAGE = 10_000
# With appendfsync everysec Redis calls fsync once a second, so an OS crash
# loses about the last second of writes. A SIGKILL keeps the kernel's page
# cache and should lose nothing. The bound adds a second of margin for a slow
# fsync, and the test prints what was lost.
AOF_LOSS_BOUND_SECONDS = 2.0

JOINER_RETRY = re.compile(
    r"Joining failed on Redis \(attempt (\d+): .+\); offsets stay uncommitted, "
    r"retrying in ([\d.]+) s"
)
TRAINER_RETRY = re.compile(
    r"(De-duplicating failed on Redis|Publishing a snapshot failed) \(attempt (\d+): .+\)"
)


@pytest.fixture
def outage_env(live_env: dict[str, str], own_redis: RedisServer) -> dict[str, str]:
    return {**live_env, "ONLINE_CTR_REDIS_URL": own_redis.url}


def committed_offsets(admin: KafkaAdminClient, group: str) -> dict[tuple[str, int], int]:
    """Return the group's committed offset per (topic, partition)."""
    offsets = admin.list_group_offsets({group: None})[group]
    return {(tp.topic, tp.partition): meta.offset for tp, meta in offsets.items()}


def seconds_until_commits_move(
    admin: KafkaAdminClient,
    groups: dict[str, str],
    frozen: dict[str, dict[tuple[str, int], int]],
    timeout: float,
) -> dict[str, float]:
    """Return, per service, the seconds until its group committed offsets other than ``frozen``.

    A service that commits nothing new within ``timeout`` is missing from the result.
    """
    started = time.monotonic()
    moved: dict[str, float] = {}
    while len(moved) < len(groups) and time.monotonic() - started < timeout:
        for name, group in groups.items():
            if name not in moved and committed_offsets(admin, group) != frozen[name]:
                moved[name] = time.monotonic() - started
        time.sleep(0.2)
    return moved


def learned_count(server: RedisServer, namespace: str) -> int:
    """Count the trainer's markers, or return -1 while Redis is down."""
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=5)
    try:
        return len(learned_labels(client, namespace))
    except redis.exceptions.RedisError:
        return -1
    finally:
        client.close()


@pytest.mark.parametrize("shutdown", ["stop", "kill"])
def test_pipeline_survives_redis_outage(
    shutdown: str, outage_env, own_redis: RedisServer, start_service, kafka_broker
) -> None:
    env = outage_env
    expected = replay_labels(SAMPLE)
    namespace = env["ONLINE_CTR_DEDUP_NAMESPACE"]
    groups = {
        "joiner": env["ONLINE_CTR_JOINER_GROUP_ID"],
        "trainer": env["ONLINE_CTR_TRAINER_GROUP_ID"],
    }
    produce(SAMPLE, env)
    joiner = start_service(["joiner"], env, name="joiner")
    trainer = start_service(["trainer"], env, name="trainer")
    pids = (joiner.process.pid, trainer.process.pid)
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker.bootstrap)

    try:
        wait_until(
            lambda: learned_count(own_redis, namespace) >= LEARNED_BEFORE_OUTAGE,
            timeout=120,
            message=f"the trainer did not learn {LEARNED_BEFORE_OUTAGE} examples",
            services=(joiner, trainer),
        )
        learned_before = learned_count(own_redis, namespace)

        # "stop" is a clean shutdown (SIGTERM), which writes the append-only
        # file; "kill" is SIGKILL, as in a crash.
        down_at = time.monotonic()
        getattr(own_redis, shutdown)()
        wait_until(
            lambda: JOINER_RETRY.search(joiner.log()) is not None,
            timeout=OUTAGE_SECONDS,
            message="the joiner logged no Redis retry",
            services=(joiner,),
        )
        wait_until(
            lambda: TRAINER_RETRY.search(trainer.log()) is not None,
            timeout=OUTAGE_SECONDS,
            message="the trainer logged no Redis retry",
            services=(trainer,),
        )
        # A cycle that finished its Redis calls before the shutdown may still
        # commit, so the frozen offsets are read after each service's first failure.
        frozen = {name: committed_offsets(admin, group) for name, group in groups.items()}
        during_outage = []
        while time.monotonic() < down_at + OUTAGE_SECONDS:
            during_outage.append(
                {name: committed_offsets(admin, group) for name, group in groups.items()}
            )
            time.sleep(1.0)

        own_redis.start()
        up_at = time.monotonic()
        outage = up_at - down_at
        resumed = seconds_until_commits_move(admin, groups, frozen, timeout=60)
        assert set(resumed) == set(groups), (resumed, joiner.log()[-3000:], trainer.log()[-3000:])

        wait_until(
            lambda: (
                learned_count(own_redis, namespace) >= len(expected)
                or not (joiner.is_running() and trainer.is_running())
            ),
            timeout=180,
            message="the trainer did not see every example after the outage",
            services=(joiner, trainer),
        )
        drained = time.monotonic() - up_at
    finally:
        admin.close()

    assert joiner.is_running(), joiner.log()
    assert trainer.is_running(), trainer.log()
    assert (joiner.process.pid, trainer.process.pid) == pids
    assert trainer.stop() == 0, trainer.log()
    assert joiner.stop() == 0, joiner.log()
    print(
        f"\nRedis {shutdown}: outage {outage:.1f} s with {learned_before} of {len(expected)} "
        f"labels learned; joiner committed again {resumed['joiner']:.1f} s and trainer "
        f"{resumed['trainer']:.1f} s after Redis was ready; drained {drained:.1f} s after it"
    )

    # Each service ran once, and neither committed during the outage.
    assert joiner.log().count("Joiner started") == 1
    assert trainer.log().count("Trainer started") == 1
    assert learned_before < len(expected)
    assert all(offsets == frozen for offsets in during_outage), during_outage
    assert frozen["joiner"], "the joiner had committed nothing before the outage"
    assert frozen["trainer"], "the trainer had committed nothing before the outage"

    # The back-off grows from 0.5 s, one logged retry after another.
    joiner_delays = [float(delay) for _, delay in JOINER_RETRY.findall(joiner.log())]
    assert len(joiner_delays) >= 3, joiner.log()[-3000:]
    assert joiner_delays[:3] == [0.5, 1.0, 2.0]
    assert TRAINER_RETRY.search(trainer.log()) is not None, trainer.log()[-3000:]

    client = redis.Redis.from_url(own_redis.url)
    try:
        assert learned_labels(client, namespace) == expected
        metadata, _ = newest_snapshot(client, env["ONLINE_CTR_REGISTRY_NAMESPACE"])
    finally:
        client.close()
    assert metadata.examples_seen == len(expected)


def test_aof_keeps_acknowledged_writes_after_kill(own_redis: RedisServer) -> None:
    # A writer increments a counter as fast as Redis acknowledges, and records
    # when each value was acknowledged, until redis-server is killed under it.
    acknowledged: list[tuple[int, float]] = []
    stopped = threading.Event()

    def write() -> None:
        client = redis.Redis.from_url(own_redis.url, socket_timeout=5)
        try:
            while not stopped.is_set():
                acknowledged.append((client.incr("counter"), time.monotonic()))
        except redis.exceptions.ConnectionError:
            pass
        finally:
            client.close()

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(3.0)
    killed_at = time.monotonic()
    own_redis.kill()
    stopped.set()
    writer.join(timeout=10)
    assert not writer.is_alive()

    own_redis.start()
    client = redis.Redis.from_url(own_redis.url)
    try:
        survived = int(client.get("counter") or 0)
    finally:
        client.close()

    last_value, _ = acknowledged[-1]
    lost = [at for value, at in acknowledged if value > survived]
    lost_seconds = killed_at - lost[0] if lost else 0.0
    print(
        f"\nAOF everysec, SIGKILL: {last_value} writes acknowledged in 3 s, "
        f"{len(lost)} lost ({lost_seconds:.3f} s of writes)"
    )
    assert last_value > 1000
    assert survived <= last_value + 1
    assert lost_seconds <= AOF_LOSS_BOUND_SECONDS
