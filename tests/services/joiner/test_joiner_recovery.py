"""The joiner's cycle when Redis or the broker fails, driven with stand-ins and a manual clock.

The stand-in consumer returns scripted polls and records commits and seeks.
The store is the in-memory one, made to raise Redis errors on demand.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import pytest
import redis
from kafka import TopicPartition
from kafka.errors import KafkaError, KafkaTimeoutError
from prometheus_client import CollectorRegistry

from services.joiner.app import Joiner
from services.joiner.metrics import JoinerMetrics
from services.joiner.settings import JoinerSettings
from shared.clock import ManualClock
from shared.events import Click, Impression, encode, parse_example
from shared.join import InMemoryJoinStore

IMPRESSIONS, CLICKS = "impressions", "clicks"
PARTITIONS = (0, 1)


@dataclass
class Record:
    """The fields of a kafka-python ConsumerRecord that the joiner reads."""

    offset: int
    key: bytes | None
    value: bytes | None


class ScriptedConsumer:
    """A consumer stand-in whose polls return queued batches; it starts caught up everywhere."""

    def __init__(self) -> None:
        self.polls: list[dict[TopicPartition, list[Record]]] = []
        self.positions = {tp(topic, p): 0 for topic in (IMPRESSIONS, CLICKS) for p in PARTITIONS}
        self.highwaters = dict(self.positions)
        self.commits: list[dict[TopicPartition, int]] = []
        self.seeks: list[tuple[TopicPartition, int]] = []
        self.poll_error: Exception | None = None

    def poll(self, timeout_ms=0, max_records=None):
        if self.poll_error is not None:
            raise self.poll_error
        records = self.polls.pop(0) if self.polls else {}
        for partition, batch in records.items():
            self.positions[partition] = batch[-1].offset + 1
            self.highwaters[partition] = max(self.highwaters[partition], batch[-1].offset + 1)
        return records

    def highwater(self, partition):
        return self.highwaters.get(partition)

    def position(self, partition, timeout_ms=None):
        return self.positions[partition]

    def seek(self, partition, offset):
        self.positions[partition] = offset
        self.seeks.append((partition, offset))

    def pause(self, *partitions):
        pass

    def resume(self, *partitions):
        pass

    def commit(self, offsets, timeout_ms=None):
        self.commits.append({partition: meta.offset for partition, meta in offsets.items()})


class SendResult:
    """A completed send future: ``get`` returns at once or raises the send's error."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def get(self, timeout=None):
        if self.error is not None:
            raise self.error

    def add_errback(self, callback):
        if self.error is not None:
            callback(self.error)
        return self


class RecordingProducer:
    """A producer stand-in that keeps every send; with ``failing`` set, each send fails."""

    def __init__(self, failing: bool = False) -> None:
        self.failing = failing
        self.sent: list[bytes] = []
        self.closed = False

    def send(self, topic, value=None, key=None, headers=None):
        if self.failing:
            return SendResult(KafkaTimeoutError("broker down"))
        self.sent.append(value)
        return SendResult()

    def flush(self, timeout=None):
        pass

    def close(self, timeout=None):
        self.closed = True

    def labels(self) -> list[tuple[str, int]]:
        examples = [parse_example(value) for value in self.sent]
        return [(e.impression.impression_id, e.label) for e in examples]


class FlakyStore(InMemoryJoinStore):
    """The in-memory store, raising a Redis connection error for the partitions in ``down``."""

    def __init__(self) -> None:
        super().__init__()
        self.down: set[int] = set()

    def _check(self, partition: int) -> None:
        if partition in self.down:
            raise redis.exceptions.ConnectionError("Connection refused")

    def load(self, partition, *args, **kwargs):
        self._check(partition)
        return super().load(partition, *args, **kwargs)

    def outbox(self, partition):
        self._check(partition)
        return super().outbox(partition)


def tp(topic: str, partition: int) -> TopicPartition:
    return TopicPartition(topic, partition)


def impression(impression_id: str, event_time: float, offset: int) -> Record:
    event = Impression(impression_id=impression_id, event_time=event_time, item_id="a")
    return Record(offset, impression_id.encode(), encode(event))


def click(impression_id: str, event_time: float, offset: int) -> Record:
    event = Click(impression_id=impression_id, event_time=event_time)
    return Record(offset, impression_id.encode(), encode(event))


def build_joiner(
    max_poll_records: int = 2000, producer_factory=None
) -> tuple[Joiner, ScriptedConsumer, RecordingProducer, FlakyStore, CollectorRegistry]:
    settings = JoinerSettings(
        topic_impressions=IMPRESSIONS, topic_clicks=CLICKS, max_poll_records=max_poll_records
    )
    consumer, producer, store = ScriptedConsumer(), RecordingProducer(), FlakyStore()
    registry = CollectorRegistry()
    joiner = Joiner(
        settings,
        consumer,
        producer,
        store,
        JoinerMetrics(registry),
        clock=ManualClock(time.time()),
        producer_factory=producer_factory,
    )
    return joiner, consumer, producer, store, registry


def retries(registry: CollectorRegistry, dependency: str) -> float:
    value = registry.get_sample_value("octr_joiner_retries_total", {"dependency": dependency})
    return value or 0.0


def test_redis_outage_backs_off_without_commit(caplog: pytest.LogCaptureFixture) -> None:
    joiner, consumer, producer, store, registry = build_joiner()
    now = joiner.clock.time()
    consumer.polls.append({tp(CLICKS, 0): [click("i1", now - 50, 0)]})
    consumer.polls.append({tp(IMPRESSIONS, 0): [impression("i1", now - 60, 0)]})
    store.down = {0}

    delays = []
    with caplog.at_level(logging.WARNING, logger="services.joiner.app"):
        for _ in range(4):
            joiner.run_cycle()
            delays.append(round(joiner.retry_at - joiner.clock.monotonic(), 3))
            joiner.clock.advance(delays[-1])

    assert delays == [0.5, 1.0, 2.0, 4.0]
    assert consumer.commits == []
    assert producer.sent == []
    assert retries(registry, "redis") == 4
    assert "Joining failed on Redis (attempt 4: Connection refused)" in caplog.text
    assert "offsets stay uncommitted, retrying in 4.0 s" in caplog.text

    store.down = set()
    joiner.run_cycle()

    assert producer.labels() == [("i1", 1)]
    assert consumer.commits == [{tp(IMPRESSIONS, 0): 1, tp(CLICKS, 0): 1}]
    assert joiner.backoff.attempt == 0


def test_partial_redis_failure_produces_outbox_first() -> None:
    joiner, consumer, producer, store, _ = build_joiner()
    now = joiner.clock.time()
    consumer.polls.append(
        {
            tp(IMPRESSIONS, 0): [impression("p0", now - 60, 0)],
            tp(CLICKS, 0): [click("p0", now - 50, 0)],
            tp(IMPRESSIONS, 1): [impression("p1", now - 60, 0)],
        }
    )
    # Partition 0 is joined and its example stored in the outbox, then
    # partition 1 fails: the cycle ends before anything is produced.
    store.down = {1}
    joiner.run_cycle()
    assert producer.sent == []
    assert store.outbox(0)

    store.down = set()
    joiner.clock.advance(0.5)
    joiner.run_cycle()

    assert producer.labels() == [("p0", 1)]
    assert store.outbox(0) == []
    assert consumer.commits == [
        {tp(IMPRESSIONS, 0): 1, tp(CLICKS, 0): 1, tp(IMPRESSIONS, 1): 1},
    ]


def test_failed_delivery_replaces_producer(caplog: pytest.LogCaptureFixture) -> None:
    replacement = RecordingProducer()
    joiner, consumer, producer, _, registry = build_joiner(producer_factory=lambda: replacement)
    producer.failing = True
    now = joiner.clock.time()
    consumer.polls.append(
        {
            tp(IMPRESSIONS, 0): [impression("i1", now - 60, 0)],
            tp(CLICKS, 0): [click("i1", now - 50, 0)],
        }
    )

    with caplog.at_level(logging.WARNING, logger="services.joiner.app"):
        joiner.run_cycle()
    assert consumer.commits == []
    assert retries(registry, "kafka") == 1
    assert "Producing 1 examples failed on Kafka (attempt 1: " in caplog.text

    joiner.clock.advance(0.5)
    joiner.run_cycle()

    assert producer.closed
    assert joiner.producer is replacement
    assert joiner.dead_letters.producer is replacement
    assert replacement.labels() == [("i1", 1)]
    assert consumer.commits == [{tp(IMPRESSIONS, 0): 1, tp(CLICKS, 0): 1}]


def test_reset_position_restarts_partition(caplog: pytest.LogCaptureFixture) -> None:
    joiner, consumer, producer, _, _ = build_joiner()
    now = joiner.clock.time()
    # Two clicks stay buffered because more impressions are still to come.
    consumer.polls.append(
        {
            tp(IMPRESSIONS, 0): [impression(f"i{n}", now - 600 + n, n) for n in range(3)],
            tp(CLICKS, 0): [click("i9", now - 100, 3), click("i8", now - 99, 4)],
        }
    )
    consumer.highwaters[tp(IMPRESSIONS, 0)] = 10
    joiner.run_cycle()
    assert consumer.commits[-1] == {tp(IMPRESSIONS, 0): 3, tp(CLICKS, 0): 3}

    # The clicks topic was created again: the consumer reset its position to
    # 0 and fetched the new topic's first record.
    consumer.polls.append({tp(CLICKS, 0): [click("i0", now - 598, 0)]})
    with caplog.at_level(logging.WARNING, logger="services.joiner.app"):
        joiner.run_cycle()

    assert "Consumer positions of partition 0 moved back" in caplog.text
    assert sorted(consumer.seeks) == [(tp(CLICKS, 0), 0), (tp(IMPRESSIONS, 0), 3)]
    assert 0 not in joiner.buffers
    assert consumer.commits[-1] == {tp(IMPRESSIONS, 0): 3, tp(CLICKS, 0): 3}


def test_reset_without_records_restarts_partition() -> None:
    joiner, consumer, _, _, _ = build_joiner()
    now = joiner.clock.time()
    consumer.polls.append({tp(CLICKS, 0): [click("i9", now - 100, 5)]})
    consumer.highwaters[tp(IMPRESSIONS, 0)] = 4
    joiner.run_cycle()
    assert len(joiner.buffers[0].sides[1]) == 1

    # An out-of-range reset moved the position back before any new fetch.
    consumer.positions[tp(CLICKS, 0)] = 0
    joiner.run_cycle()

    assert (tp(CLICKS, 0), 0) in consumer.seeks
    assert 0 not in joiner.buffers


def test_position_past_highwater_is_not_caught_up() -> None:
    joiner, consumer, _, _, _ = build_joiner()
    consumer.positions[tp(CLICKS, 0)] = 15_000
    consumer.highwaters[tp(CLICKS, 0)] = 12

    assert not joiner._is_caught_up(tp(CLICKS, 0))


def test_cycle_joins_at_most_max_poll_records() -> None:
    joiner, consumer, producer, _, _ = build_joiner(max_poll_records=3)
    now = joiner.clock.time()
    consumer.polls.append(
        {tp(IMPRESSIONS, 0): [impression(f"i{n}", now - 900 + n, n) for n in range(5)]}
    )

    joiner.run_cycle()
    joiner.run_cycle()

    assert [commit[tp(IMPRESSIONS, 0)] for commit in consumer.commits] == [3, 5]


def test_failed_poll_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    joiner, consumer, _, _, registry = build_joiner()
    consumer.poll_error = KafkaError("User rebalance callback throws an error")

    with caplog.at_level(logging.WARNING, logger="services.joiner.app"):
        started = joiner.clock.monotonic()
        joiner.run_cycle()

    assert joiner.clock.monotonic() - started == 0.5
    assert retries(registry, "kafka") == 1
    assert "Polling failed on Kafka (attempt 1: " in caplog.text
