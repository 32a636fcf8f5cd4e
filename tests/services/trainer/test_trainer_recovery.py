"""The trainer's cycle when Redis fails or a rebalance resets its positions.

The unit tests drive ``Trainer`` with stand-ins and a manual clock. The last
test runs ``RedisDeduplicator`` against the session's Redis server.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import pytest
import redis
from kafka import TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry

from services.trainer.app import Trainer
from services.trainer.dedup import RedisDeduplicator, Sighting
from services.trainer.metrics import TrainerMetrics
from services.trainer.settings import TrainerSettings
from shared.clock import ManualClock
from shared.errors import UnavailableError
from shared.events import Impression, LabeledExample, LabelSource, encode

TOPIC = "examples"


@dataclass
class Record:
    """The fields of a kafka-python ConsumerRecord that the trainer reads."""

    offset: int
    value: bytes


@dataclass
class Published:
    """The part of the registry's snapshot metadata that the trainer reads."""

    version: int


class ScriptedConsumer:
    """A consumer stand-in whose polls return queued batches; it records seeks and commits."""

    def __init__(self) -> None:
        self.polls: list[dict[TopicPartition, list[Record]]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.commits: list[dict[TopicPartition, int]] = []
        self.poll_error: Exception | None = None

    def poll(self, timeout_ms=0, max_records=None):
        if self.poll_error is not None:
            raise self.poll_error
        return self.polls.pop(0) if self.polls else {}

    def seek(self, partition, offset):
        self.seeks.append((partition, offset))

    def commit(self, offsets, timeout_ms=None):
        self.commits.append({partition: meta.offset for partition, meta in offsets.items()})

    def assignment(self):
        return set()


class SwitchableRegistry:
    """A model registry stand-in that raises UnavailableError while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.published = 0

    def publish(self, bundle, **kwargs):
        if self.down:
            raise UnavailableError("Redis unavailable while assigning a version")
        self.published += 1
        return Published(self.published)


class SwitchableDeduplicator:
    """A deduplicator stand-in that learns every example, or raises while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False

    def first_sightings(self, sightings, read_through=None):
        if self.down:
            raise redis.exceptions.ConnectionError("Connection refused")
        return [True] * len(sightings)


def build_trainer() -> tuple[Trainer, ScriptedConsumer, SwitchableRegistry, SwitchableDeduplicator]:
    settings = TrainerSettings(topic_examples=TOPIC, snapshot_every_seconds=1)
    consumer, registry, deduplicator = (
        ScriptedConsumer(),
        SwitchableRegistry(),
        SwitchableDeduplicator(),
    )
    trainer = Trainer(
        settings,
        consumer,
        registry,
        deduplicator,
        TrainerMetrics(CollectorRegistry()),
        clock=ManualClock(1_000.0),
    )
    return trainer, consumer, registry, deduplicator


def example_record(offset: int) -> Record:
    example = LabeledExample(
        impression=Impression(
            impression_id=f"i{offset}", event_time=1_000.0, item_id="a", features={"ad": "a"}
        ),
        label=offset % 2,
        label_delay_seconds=1.0,
        label_source=LabelSource.CLICK if offset % 2 else LabelSource.WINDOW_CLOSED,
        decided_at=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    )
    return Record(offset, encode(example))


def test_snapshot_positions_seeked_once() -> None:
    trainer, consumer, _, _ = build_trainer()
    trainer.restored_positions = {0: 5, 1: 7}
    partitions = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]

    trainer.on_assigned(partitions)
    trainer.on_revoked(partitions)
    trainer.on_assigned(partitions)

    assert consumer.seeks == [(partitions[0], 5), (partitions[1], 7)]


def test_redis_outage_rereads_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    trainer, consumer, _, deduplicator = build_trainer()
    partition = TopicPartition(TOPIC, 0)
    batch = [example_record(offset) for offset in range(3)]
    deduplicator.down = True

    with caplog.at_level(logging.WARNING, logger="services.trainer.app"):
        for _ in range(3):
            consumer.polls.append({partition: batch})
            started = trainer.clock.monotonic()
            trainer.run_cycle()
            assert trainer.clock.monotonic() - started in (0.5, 1.0, 2.0)

    assert consumer.seeks == [(partition, 0)] * 3
    assert trainer.examples_seen == 0
    assert "De-duplicating failed on Redis (attempt 3: Connection refused); 3 examples" in (
        caplog.text
    )
    assert "after a retry in 2.0 s" in caplog.text

    deduplicator.down = False
    consumer.polls.append({partition: batch})
    trainer.run_cycle()

    assert trainer.examples_seen == 3
    assert trainer.redis_backoff.attempt == 0


def test_failed_publish_backs_off_without_commit(caplog: pytest.LogCaptureFixture) -> None:
    trainer, consumer, registry, _ = build_trainer()
    partition = TopicPartition(TOPIC, 0)
    consumer.polls.append({partition: [example_record(0), example_record(1)]})
    registry.down = True
    trainer.clock.advance(1.0)

    with caplog.at_level(logging.WARNING, logger="services.trainer.app"):
        trainer.run_cycle()
        # The next snapshot is due again only after the back-off delay.
        trainer.clock.advance(0.4)
        trainer.run_cycle()

    assert consumer.commits == []
    assert caplog.text.count("Publishing a snapshot failed (attempt 1: ") == 1
    assert "offsets stay uncommitted, retrying in 0.5 s" in caplog.text

    registry.down = False
    trainer.clock.advance(0.1)
    trainer.run_cycle()

    assert registry.published == 1
    assert consumer.commits == [{partition: 2}]


@pytest.mark.integration
def test_replay_below_read_position_is_duplicate(
    redis_client: redis.Redis, unique_name: str
) -> None:
    deduplicator = RedisDeduplicator(redis_client, f"{unique_name}:trainer", 60)
    first = Sighting("i1/click", TOPIC, 0, 7)
    elsewhere = Sighting("i1/click", TOPIC, 0, 9)

    assert deduplicator.first_sightings([first]) == [True]
    # The same record read again: learned after a restart from an older
    # snapshot, dropped when this process has read past it already.
    assert deduplicator.first_sightings([first]) == [True]
    assert deduplicator.first_sightings([first], {0: 7}) == [True]
    assert deduplicator.first_sightings([first], {0: 8}) == [False]
    assert deduplicator.first_sightings([elsewhere]) == [False]


def test_revoke_publishes_without_commit() -> None:
    trainer, consumer, registry, _ = build_trainer()
    partition = TopicPartition(TOPIC, 0)
    consumer.polls.append({partition: [example_record(0)]})
    trainer.run_cycle()
    assert registry.published == 0

    trainer.on_revoked([partition])

    assert registry.published == 1
    assert consumer.commits == []
    assert trainer.unpublished == 0


def test_failed_poll_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    trainer, consumer, _, _ = build_trainer()
    consumer.poll_error = KafkaError("User rebalance callback throws an error")

    with caplog.at_level(logging.WARNING, logger="services.trainer.app"):
        for expected_delay in (0.5, 1.0):
            started = trainer.clock.monotonic()
            trainer.run_cycle()
            assert trainer.clock.monotonic() - started == expected_delay

    assert "Polling Kafka failed (attempt 2: " in caplog.text
    consumer.poll_error = None
    trainer.run_cycle()
    assert trainer.kafka_backoff.attempt == 0
