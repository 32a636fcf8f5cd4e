"""A broker outage under the live joiner and trainer, with a broker that keeps data in memory.

The test runs its own Tansu broker, kills it with SIGKILL mid-stream and
starts it again on the same port about 10 s later. Tansu keeps topics, records,
consumer groups and committed offsets in memory, so the restarted broker has
none of them: the test creates the topics again and produces the recorded
stream again, as a source that keeps its data would. The services must
reconnect in the same processes, read the new topics from offset 0 (their old
positions are past the end of the new topics), and in the end have learned
exactly the labels that offline replay decides.

Examples that the old broker acknowledged but the trainer had not read yet
would be lost with it, and the joiner never emits them again because its
state in Redis records them as decided. Apache Kafka keeps them on disk. So the
test pauses the joiner with SIGSTOP, waits until the trainer has learned
everything on the examples topic, and kills the broker with the joiner's cycle
in flight, then resumes the joiner with SIGCONT.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from shared.kafka import TopicSpec, create_topics
from shared.localstack import TansuBroker
from shared.localstack import create_topics as create_topics_and_wait
from tests.services.conftest import service_env, topic_partitions, trainer_env, wait_until
from tests.services.joiner.test_joiner_live import SAMPLE, ExampleReader, produce, replay_labels
from tests.services.test_pipeline_live import learned_labels, newest_snapshot

pytestmark = pytest.mark.integration

OUTAGE_SECONDS = 10.0
LEARNED_BEFORE_OUTAGE = 10_000


@pytest.fixture
def broker_env(own_broker: TansuBroker, redis_server, unique_name: str) -> dict[str, str]:
    env = {
        **service_env(own_broker.bootstrap, redis_server.url, unique_name),
        # Longer than the gap between the new topics' creation and their
        # first records, so no window closes early after the restart.
        "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "10",
        # The joiner reads the whole stream again from offset 0. It treats
        # a repeated impression as a duplicate only while it remembers the
        # impression, so the retention covers the sample's 7 days.
        "ONLINE_CTR_CLOSED_RETENTION_SECONDS": str(8 * 86_400),
        **trainer_env(unique_name),
    }
    create_topics_and_wait(own_broker.bootstrap, topic_partitions(env))
    return env


def recreate_topics(bootstrap: str, env: dict[str, str]) -> None:
    """Create the topics on the restarted broker, keeping any that a client created first.

    Tansu 0.6 creates a missing topic with 4 partitions when a client requests
    its metadata, even with ``allow_auto_create_topics=False``, so the services
    may have created some already.
    """
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        specs = [TopicSpec(name, count) for name, count in topic_partitions(env).items()]
        create_topics(admin, specs)
    finally:
        admin.close()


def caught_up(reader: ExampleReader) -> bool:
    """Poll the reader once and tell whether it has read to the high watermark everywhere."""
    reader.poll()
    assignment = reader.consumer.assignment()
    if not assignment:
        return False
    for tp in assignment:
        highwater = reader.consumer.highwater(tp)
        if highwater is None or reader.consumer.position(tp) < highwater:
            return False
    return True


def records_per_partition(bootstrap: str, topics: list[str]) -> dict[tuple[str, int], int]:
    """Read the topics from the beginning without a group; return each partition's record count."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    try:
        partitions = [
            TopicPartition(topic, partition)
            for topic in topics
            for partition in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        consumer.assign(partitions)
        counts = {(tp.topic, tp.partition): 0 for tp in partitions}
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 2.0:
            batches = consumer.poll(timeout_ms=200)
            for tp, batch in batches.items():
                counts[(tp.topic, tp.partition)] = batch[-1].offset + 1
            if batches:
                quiet_since = time.monotonic()
        return counts
    finally:
        consumer.close()


def test_pipeline_survives_broker_restart(
    broker_env, own_broker: TansuBroker, start_service, redis_client: redis.Redis
) -> None:
    env = broker_env
    expected = replay_labels(SAMPLE)
    namespace = env["ONLINE_CTR_DEDUP_NAMESPACE"]
    produce(SAMPLE, env)
    joiner = start_service(["joiner"], env, name="joiner")
    trainer = start_service(["trainer"], env, name="trainer")
    pids = (joiner.process.pid, trainer.process.pid)

    wait_until(
        lambda: len(learned_labels(redis_client, namespace)) >= LEARNED_BEFORE_OUTAGE,
        timeout=120,
        message=f"the trainer did not learn {LEARNED_BEFORE_OUTAGE} examples",
        services=(joiner, trainer),
    )

    # Hold the joiner still until the trainer has learned every example on the
    # broker, so that the broker takes no unlearned example with it.
    reader = ExampleReader(own_broker.bootstrap, env["ONLINE_CTR_TOPIC_EXAMPLES"])
    os.kill(joiner.process.pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: (
                caught_up(reader) and learned_labels(redis_client, namespace) >= reader.labels()
            ),
            timeout=60,
            message="the trainer did not catch up with the examples topic",
            services=(trainer,),
        )
        learned_before = len(learned_labels(redis_client, namespace))
        reader.consumer.close()
        down_at = time.monotonic()
        own_broker.kill()
    finally:
        os.kill(joiner.process.pid, signal.SIGCONT)

    time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))
    joiner_log_before = len(joiner.log())
    trainer_log_before = len(trainer.log())
    own_broker.start()
    up_at = time.monotonic()
    outage = up_at - down_at
    recreate_topics(own_broker.bootstrap, env)
    produce(SAMPLE, env)
    produced_again = time.monotonic() - up_at

    wait_until(
        lambda: len(learned_labels(redis_client, namespace)) > learned_before,
        timeout=120,
        message="nothing new was learned after the broker came back",
        services=(joiner, trainer),
    )
    first_new_label = time.monotonic() - up_at
    wait_until(
        lambda: (
            len(learned_labels(redis_client, namespace)) >= len(expected)
            or not (joiner.is_running() and trainer.is_running())
        ),
        timeout=180,
        message="the trainer did not see every example after the broker came back",
        services=(joiner, trainer),
    )
    drained = time.monotonic() - up_at

    assert joiner.is_running(), joiner.log()
    assert trainer.is_running(), trainer.log()
    assert (joiner.process.pid, trainer.process.pid) == pids
    input_records = records_per_partition(
        own_broker.bootstrap,
        [env["ONLINE_CTR_TOPIC_IMPRESSIONS"], env["ONLINE_CTR_TOPIC_CLICKS"]],
    )
    admin = KafkaAdminClient(bootstrap_servers=own_broker.bootstrap)
    try:
        committed = admin.list_group_offsets({env["ONLINE_CTR_JOINER_GROUP_ID"]: None})
    finally:
        admin.close()
    assert trainer.stop() == 0, trainer.log()
    assert joiner.stop() == 0, joiner.log()
    print(
        f"\nBroker SIGKILL: outage {outage:.1f} s with {learned_before} of {len(expected)} "
        f"labels learned; topics created and stream produced again {produced_again:.1f} s, "
        f"first new label learned {first_new_label:.1f} s and all {drained:.1f} s after the "
        "broker was ready"
    )

    # Both services ran once and went through the outage in the same process.
    joiner_log, trainer_log = joiner.log(), trainer.log()
    assert joiner_log.count("Joiner started") == 1
    assert trainer_log.count("Trainer started") == 1
    assert learned_before < len(expected)

    # The joiner's delivery failed, backed off and went on with a new producer,
    # because the idempotent producer cannot continue on a broker that forgot it.
    after_restart = joiner_log[joiner_log_before:]
    assert "examples failed on Kafka (attempt 1:" in joiner_log, joiner_log[-5000:]
    assert "retrying in 0.5 s" in joiner_log
    assert "Replaced the Kafka producer after a failed delivery" in joiner_log
    assert "Partitions assigned: [0, 1, 2, 3]" in after_restart, after_restart[-5000:]
    # The trainer had nothing to commit during the outage; its consumer
    # reconnected with kafka-python's own back-off and joined the new group.
    assert "ECONNREFUSED" in trainer_log
    assert "Partitions assigned: [0, 1, 2, 3]" in trainer_log[trainer_log_before:]

    # The joiner's offsets on the new broker point exactly at the end of the
    # new input topics: none of the old, larger positions were committed.
    joiner_offsets = {
        (tp.topic, tp.partition): meta.offset
        for tp, meta in committed[env["ONLINE_CTR_JOINER_GROUP_ID"]].items()
    }
    assert joiner_offsets == input_records

    assert learned_labels(redis_client, namespace) == expected
    metadata, _ = newest_snapshot(redis_client, env["ONLINE_CTR_REGISTRY_NAMESPACE"])
    assert metadata.examples_seen == len(expected)
