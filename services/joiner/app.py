"""The joiner's consume-join-produce-commit loop.

One joiner owns a set of partition numbers. For each it consumes the same
partition of the impressions and clicks topics (they are co-partitioned and
assigned together by the range assignor), merges the two by event time, runs
the shared join state machine on a Redis store, and produces the decided
examples. Each poll is one cycle:

1. poll, parse, and send invalid records to the dead-letter topic;
2. per partition, take the events that are safe to process in event-time
   order and commit them through the join (state and outbox in one Redis call);
3. produce the examples and wait for the broker's acknowledgement;
4. acknowledge the outbox, then commit the consumer offsets.

A crash anywhere re-runs the cycle from the last committed offsets. The join
turns replayed events into counted duplicates, and examples emitted but not
acknowledged are produced again from the outbox, so delivery is at least once
and the trainer removes the duplicates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from services.joiner.metrics import JoinerMetrics
from services.joiner.settings import JoinerSettings
from shared.clock import Clock, SystemClock
from shared.errors import InvalidEventError, describe_value
from shared.events import (
    Click,
    Impression,
    LabeledExample,
    check_event_time,
    encode,
    parse_click,
    parse_impression,
)
from shared.join import JoinStateMachine, JoinStore
from shared.kafka import DeadLetterSink
from shared.service import ExponentialBackoff

logger = logging.getLogger(__name__)

IMPRESSIONS, CLICKS = 0, 1
# The producer rejects requests over its max_request_size (1 MiB by default),
# so an oversized invalid record would stop the joiner each time it is read
# again. Its dead-letter copy keeps only this many leading bytes of the key
# and the value. The source offset in the headers leads to the original.
MAX_DEAD_LETTER_BYTES = 512 * 1024
# An offset commit waits at most this long for the group coordinator. During a
# broker outage kafka-python would otherwise retry for the consumer's request
# timeout, and the uncommitted offsets are committed again by the next cycle.
COMMIT_TIMEOUT_MS = 10_000


@dataclass(slots=True)
class _Buffered:
    event: Impression | Click
    offset: int


@dataclass
class _PartitionBuffers:
    """Parsed events of one partition number, per side, waiting to be merged by event time."""

    sides: tuple[deque[_Buffered], deque[_Buffered]] = field(
        default_factory=lambda: (deque(), deque())
    )
    # The next offset to commit per side: everything before it is handled.
    next_offset: list[int | None] = field(default_factory=lambda: [None, None])
    # The offset after the last record polled per side, to notice a consumer
    # position that moved backwards.
    next_polled: list[int | None] = field(default_factory=lambda: [None, None])
    idle_since: float | None = None

    def mark_handled(self, side: int, offset: int) -> None:
        """Record that the record at ``offset`` needs no more work."""
        current = self.next_offset[side]
        self.next_offset[side] = offset + 1 if current is None else max(current, offset + 1)

    def commit_offset(self, side: int) -> int | None:
        """Return the offset to commit: the first waiting record, or one past the last handled."""
        queue = self.sides[side]
        return queue[0].offset if queue else self.next_offset[side]


class _RebalanceListener(ConsumerRebalanceListener):
    def __init__(self, joiner: Joiner) -> None:
        self.joiner = joiner

    def on_partitions_revoked(self, revoked):
        self.joiner.on_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.joiner.on_assigned(assigned)


class Joiner:
    """The joiner loop; ``run`` returns when ``stop`` is set and the current cycle is committed."""

    def __init__(
        self,
        settings: JoinerSettings,
        consumer: KafkaConsumer,
        producer: KafkaProducer,
        store: JoinStore,
        metrics: JoinerMetrics,
        clock: Clock | None = None,
        producer_factory: Callable[[], KafkaProducer] | None = None,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.producer = producer
        # Builds a replacement after a failed delivery. An idempotent producer
        # whose broker lost its state stays failed for good, so it is replaced.
        self.producer_factory = producer_factory
        self.producer_failed = False
        self.store = store
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.machine = JoinStateMachine(store, settings.join_settings(), self.clock)
        self.dead_letters = DeadLetterSink(producer, settings.topic_dead_letter)
        self.topics = (settings.topic_impressions, settings.topic_clicks)
        self.buffers: dict[int, _PartitionBuffers] = {}
        self.paused: set[TopicPartition] = set()
        self.outbox_dirty: set[int] = set()
        self.backoff = ExponentialBackoff(max_seconds=settings.retry_max_backoff_seconds)
        self.retry_at = 0.0

    # Life cycle.

    def subscribe(self) -> None:
        """Subscribe to both input topics with the rebalance listener."""
        self.consumer.subscribe(list(self.topics), listener=_RebalanceListener(self))

    def run(self, stop: threading.Event) -> None:
        """Run cycles until ``stop`` is set."""
        logger.info(
            "Joiner started: topics %s and %s, group %s",
            *self.topics,
            self.settings.joiner_group_id,
        )
        while not stop.is_set():
            self.run_cycle()
        logger.info("Joiner stopping")

    def close(self) -> None:
        """Leave the group and flush the producer."""
        try:
            self.producer.flush(timeout=10)
        except KafkaError as error:
            logger.warning("Producer flush at shutdown failed: %s", error)
        self.consumer.close()
        self.producer.close(timeout=10)

    def on_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """Drop buffered, unprocessed events of revoked partitions; the next owner re-reads them."""
        for tp in revoked:
            self.buffers.pop(tp.partition, None)
            self.paused.discard(tp)
        logger.info(
            "Partitions revoked: %s", sorted(f"{tp.topic}/{tp.partition}" for tp in revoked)
        )

    def on_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        """Produce again whatever a previous owner emitted but never saw acknowledged."""
        partitions = sorted({tp.partition for tp in assigned if tp.topic in self.topics})
        logger.info("Partitions assigned: %s", partitions)
        self.outbox_dirty.update(partitions)
        # The idle timeout looks only at partitions with buffers. One that gets
        # no new record after a restart must still close its open windows.
        for partition in partitions:
            self.buffers.setdefault(partition, _PartitionBuffers())

    # One cycle.

    def run_cycle(self) -> None:
        """Poll once, join what is ready, produce, and commit."""
        started = time.perf_counter()
        try:
            records = self.consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms,
                max_records=self.settings.max_poll_records,
            )
        except KafkaError as error:
            # kafka-python raises here when a rebalance fails, for example
            # while the broker is down. The next poll joins the group again.
            self._back_off("Kafka", "Polling", error)
            self.clock.sleep(self.retry_at - self.clock.monotonic())
            return

        self._restart_rewound_partitions(records)
        for tp, batch in records.items():
            self._buffer(tp, batch)
        self._update_pauses()

        # Polling goes on while a dependency is down, so the consumer keeps its
        # group membership, but nothing is joined or committed until the retry.
        if self.clock.monotonic() < self.retry_at:
            return
        joined_examples = self._recover_and_join()
        if joined_examples is None:
            return
        examples, joined = joined_examples

        if not self._deliver(examples):
            return
        self._commit()
        self.backoff.reset()
        self._update_gauges()
        if records or joined:
            self.metrics.batch_duration.observe(time.perf_counter() - started)

    def _recover_and_join(self) -> tuple[list[tuple[int, LabeledExample]], int] | None:
        """Produce unacknowledged outboxes, then join; after a failure, back off and return None."""
        try:
            self._replace_failed_producer()
        except KafkaError as error:
            self._back_off("Kafka", "Building a new producer", error)
            return None

        try:
            self._recover_outboxes()
            examples, joined = self._join_ready()
            examples += self._advance_idle()
        except redis.exceptions.RedisError as error:
            self._back_off("Redis", "Joining", error)
            return None
        except KafkaError as error:
            self._back_off("Kafka", "Producing the outbox", error)
            self.producer_failed = True
            return None
        return examples, joined

    def _restart_rewound_partitions(self, records: dict) -> None:
        """Drop the buffers of partitions whose consumer position moved back, and read them again.

        Without a rebalance the position moves back only when kafka-python resets
        an out-of-range position to the earliest offset, for example after a
        broker lost the topic and it was created again. The reset side then
        looks caught up, so merging the buffered events would let the other side
        run ahead of events not read yet and close windows early. Offsets kept
        from before would also be committed for records never read. So both
        sides start over: the reset side from its new position, the other from
        its first unprocessed offset. This poll's records of the partition are
        dropped and fetched again.
        """
        for partition, buffers in list(self.buffers.items()):
            tps = [TopicPartition(topic, partition) for topic in self.topics]
            starts: list[int | None] = []
            rewound = False
            for side, tp in enumerate(tps):
                batch = records.get(tp)
                polled = buffers.next_polled[side]
                if polled is None:
                    # Nothing of this side was read yet, so nothing needs reading again.
                    starts.append(batch[0].offset if batch else None)
                    continue
                position = batch[0].offset if batch else self.consumer.position(tp)
                if position is not None and position < polled:
                    rewound = True
                    starts.append(position)
                else:
                    starts.append(buffers.commit_offset(side))
            if not rewound:
                continue

            logger.warning(
                "Consumer positions of partition %d moved back (an out-of-range offset was "
                "reset); dropping its %d buffered events and reading again from offsets %s",
                partition,
                sum(len(queue) for queue in buffers.sides),
                dict(zip(self.topics, starts, strict=True)),
            )
            for tp, start in zip(tps, starts, strict=True):
                records.pop(tp, None)
                if start is not None:
                    self.consumer.seek(tp, start)
                if tp in self.paused:
                    self.consumer.resume(tp)
                    self.paused.discard(tp)
            del self.buffers[partition]

    def _buffer(self, tp: TopicPartition, batch) -> None:
        side = IMPRESSIONS if tp.topic == self.topics[IMPRESSIONS] else CLICKS
        parse = parse_impression if side == IMPRESSIONS else parse_click
        buffers = self.buffers.setdefault(tp.partition, _PartitionBuffers())
        queue = buffers.sides[side]
        self.metrics.events_consumed.labels(topic=tp.topic).inc(len(batch))

        if batch:
            buffers.next_polled[side] = batch[-1].offset + 1

        for record in batch:
            try:
                event = self._parse(parse, record)
            except InvalidEventError as error:
                self._dead_letter(tp, record, error)
                buffers.mark_handled(side, record.offset)
                continue
            queue.append(_Buffered(event, record.offset))

    def _parse(self, parse, record) -> Impression | Click:
        if record.value is None:
            raise InvalidEventError(
                "$", None, "must not be null (tombstones are not events)", code="null"
            )
        event = parse(record.value)
        # The partitioner hashes the key's bytes, so the bytes are compared. A
        # key that only decodes to the id may still route elsewhere.
        if record.key != event.impression_id.encode():
            raise InvalidEventError(
                "impression_id",
                event.impression_id,
                f"must, encoded as UTF-8, equal the record key {describe_value(record.key)}, "
                "which decides the partition",
                hint="produce impressions and clicks keyed by impression_id",
                code="key_mismatch",
            )
        check_event_time(
            event,
            self.clock.time(),
            self.settings.min_event_time,
            self.settings.max_event_future_seconds,
        )
        return event

    def _dead_letter(self, tp: TopicPartition, record, error: InvalidEventError) -> None:
        value, key, message = record.value, record.key, str(error)
        key_bytes, value_bytes = len(key or b""), len(value or b"")
        if key_bytes + value_bytes > MAX_DEAD_LETTER_BYTES:
            # The key keeps at most half of the limit and the value the rest.
            key = key[: MAX_DEAD_LETTER_BYTES // 2] if key else key
            value = value[: MAX_DEAD_LETTER_BYTES - len(key or b"")] if value else value
            message += (
                f" (the dead-letter copy keeps the first {len(key or b'')} of {key_bytes} key "
                f"bytes and {len(value or b'')} of {value_bytes} value bytes)"
            )

        try:
            future = self.dead_letters.send(
                value, error.reason, message, tp.topic, tp.partition, record.offset, key
            )
        except KafkaError as send_error:
            # A producer that cannot reach the broker raises here after its
            # metadata wait. The record is counted and stays in its source topic.
            logger.error(
                "Producing the dead-letter copy of %s/%d@%d failed: %s. The record is only "
                "in its source topic.",
                tp.topic,
                tp.partition,
                record.offset,
                send_error,
            )
            self.metrics.dead_lettered.labels(topic=tp.topic, reason=error.reason).inc()
            return
        # The cycle's flush waits for this send, but only the examples' results
        # are checked, so a failed dead-letter delivery is logged here.
        future.add_errback(
            lambda exc: logger.error(
                "Producing the dead-letter copy of %s/%d@%d failed: %s. The record is only "
                "in its source topic.",
                tp.topic,
                tp.partition,
                record.offset,
                exc,
            )
        )
        self.metrics.dead_lettered.labels(topic=tp.topic, reason=error.reason).inc()
        logger.debug("Dead-lettered %s/%d@%d: %s", tp.topic, tp.partition, record.offset, error)

    def _is_caught_up(self, tp: TopicPartition) -> bool:
        """Return True when every record visible on the broker for ``tp`` has been polled."""
        highwater = self.consumer.highwater(tp)
        if highwater is None:
            return False
        # A position past the high watermark points into data the broker no
        # longer has. The consumer resets it, and until then the side is not caught up.
        return self.consumer.position(tp) == highwater

    def _take_ready(
        self, partition: int, buffers: _PartitionBuffers, limit: int
    ) -> list[tuple[int, _Buffered]]:
        """Return at most ``limit`` events that are safe to process now, in event-time order.

        The events stay in the buffers. The head of each side is compared and
        the earlier one taken. When one side is empty, the other goes on only if
        the empty side has nothing more on the broker. Otherwise an impression
        could close its window before the click already produced for it is read.
        """
        impressions, clicks = buffers.sides
        caught_up = [self._is_caught_up(TopicPartition(topic, partition)) for topic in self.topics]
        ready: list[tuple[int, _Buffered]] = []
        i = c = 0
        while len(ready) < limit:
            has_impression, has_click = i < len(impressions), c < len(clicks)
            if has_impression and has_click:
                take_click = clicks[c].event.ts < impressions[i].event.ts
            elif has_impression and caught_up[CLICKS]:
                take_click = False
            elif has_click and caught_up[IMPRESSIONS]:
                take_click = True
            else:
                break
            if take_click:
                ready.append((CLICKS, clicks[c]))
                c += 1
            else:
                ready.append((IMPRESSIONS, impressions[i]))
                i += 1
        return ready

    def _join_ready(self) -> tuple[list[tuple[int, LabeledExample]], int]:
        examples: list[tuple[int, LabeledExample]] = []
        joined = 0
        for partition, buffers in list(self.buffers.items()):
            # Polling goes on during a Redis outage, so the buffers can hold
            # far more than one poll. Joining it all in one cycle would delay
            # the next commit and poll by tens of seconds.
            ready = self._take_ready(partition, buffers, self.settings.max_poll_records)
            if not ready:
                continue

            result = self.machine.process(partition, [entry.event for _, entry in ready])

            for side, entry in ready:
                buffers.sides[side].popleft()
                buffers.mark_handled(side, entry.offset)
            buffers.idle_since = None
            joined += len(ready)
            examples += [(partition, example) for example in result.examples]
            self._count(result.counts)
        return examples, joined

    def _advance_idle(self) -> list[tuple[int, LabeledExample]]:
        """Close the open windows of partitions that stayed quiet for the idle timeout.

        Event time moves only with events, so a quiet partition would keep its
        last windows open forever. After ``idle_timeout_seconds`` of processing
        time with nothing new on either topic, its event time jumps forward by
        the window plus the allowed lateness, which closes every window open at
        that moment. A click that arrives later for one of them counts as late.
        """
        timeout = self.settings.idle_timeout_seconds
        if timeout is None:
            return []
        examples: list[tuple[int, LabeledExample]] = []
        now = self.clock.monotonic()
        for partition, buffers in self.buffers.items():
            quiet = not any(buffers.sides) and all(
                self._is_caught_up(TopicPartition(topic, partition)) for topic in self.topics
            )
            if not quiet:
                buffers.idle_since = None
                continue
            if buffers.idle_since is None:
                buffers.idle_since = now
                continue
            if now - buffers.idle_since < timeout or self.store.pending_count(partition) == 0:
                continue

            max_event_time = self.store.max_event_time(partition)
            if max_event_time is None:
                continue
            join = self.machine.settings
            jump_to = max_event_time + join.window_seconds + join.allowed_lateness_seconds
            logger.info(
                "Partition %d idle for %.0f s; closing its open windows by moving event time "
                "forward %.0f s",
                partition,
                now - buffers.idle_since,
                jump_to - max_event_time,
            )
            result = self.machine.advance_to(partition, jump_to)
            examples += [(partition, example) for example in result.examples]
            self._count(result.counts)
            buffers.idle_since = now
        return examples

    def _recover_outboxes(self) -> None:
        """Produce the outbox of partitions just assigned or whose last delivery failed."""
        for partition in sorted(self.outbox_dirty):
            pending = self.store.outbox(partition)
            if pending:
                logger.info(
                    "Producing %d unacknowledged examples of partition %d again",
                    len(pending),
                    partition,
                )
                futures = self._send(pending)
                self.producer.flush(timeout=30)
                for future in futures:
                    future.get(timeout=0)
                self.store.acknowledge(partition, [e.dedup_key for e in pending])
            self.outbox_dirty.discard(partition)

    def _send(self, examples: list[LabeledExample]) -> list:
        futures = []
        for example in examples:
            futures.append(
                self.producer.send(
                    self.settings.topic_examples,
                    key=example.impression.impression_id.encode(),
                    value=encode(example),
                )
            )
        return futures

    def _deliver(self, examples: list[tuple[int, LabeledExample]]) -> bool:
        """Produce examples, wait for the broker, then acknowledge the outbox; False on failure."""
        try:
            futures = self._send([example for _, example in examples])
            self.producer.flush(timeout=30)
            for future in futures:
                future.get(timeout=0)
        except KafkaError as error:
            self._back_off("Kafka", f"Producing {len(examples)} examples", error)
            self.producer_failed = True
            return False

        by_partition: dict[int, list[str]] = {}
        for partition, example in examples:
            by_partition.setdefault(partition, []).append(example.dedup_key)
            self.metrics.examples_emitted.labels(
                label=str(example.label), reason=example.label_source.value
            ).inc()
            self.metrics.label_delay.labels(label=str(example.label)).observe(
                example.label_delay_seconds
            )
        try:
            for partition, keys in by_partition.items():
                if keys:
                    self.store.acknowledge(partition, keys)
        except redis.exceptions.RedisError as error:
            # The examples are delivered; at worst they are produced again later.
            logger.warning("Acknowledging the outbox failed (%s); duplicates may follow", error)
            self.outbox_dirty.update(by_partition)
        return True

    def _commit(self) -> None:
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for partition, buffers in self.buffers.items():
            for side, topic in enumerate(self.topics):
                next_offset = buffers.commit_offset(side)
                if next_offset is not None:
                    offsets[TopicPartition(topic, partition)] = OffsetAndMetadata(
                        next_offset, "", -1
                    )
        if not offsets:
            return
        try:
            self.consumer.commit(offsets, timeout_ms=COMMIT_TIMEOUT_MS)
        except CommitFailedError as error:
            # The group rebalanced; the new owner re-reads from the last commit.
            logger.warning("Offset commit failed after a rebalance: %s", error)
        except KafkaError as error:
            logger.warning("Offset commit failed: %s; the next cycle retries", error)
            self.metrics.retries.labels(dependency="kafka").inc()

    # Support.

    def _count(self, counts) -> None:
        for outcome, count in counts.items():
            self.metrics.join_outcomes.labels(outcome=outcome.value).inc(count)

    def _back_off(self, dependency: str, action: str, error: Exception) -> None:
        """Skip joining and committing until an exponentially growing delay has passed."""
        # The failed cycle may have stored joined examples in the outbox of
        # some partitions before it stopped, so those are produced again first.
        self.outbox_dirty.update(self.buffers)
        delay = self.backoff.next_delay()
        self.retry_at = self.clock.monotonic() + delay
        self.metrics.retries.labels(dependency=dependency.lower()).inc()
        logger.warning(
            "%s failed on %s (attempt %d: %s); offsets stay uncommitted, retrying in %.1f s",
            action,
            dependency,
            self.backoff.attempt,
            error,
            delay,
        )

    def _replace_failed_producer(self) -> None:
        """Build a new producer if the last delivery failed; raise KafkaError if that fails."""
        if not self.producer_failed or self.producer_factory is None:
            return
        producer = self.producer_factory()
        self.producer.close(timeout=0)
        self.producer = producer
        self.dead_letters.producer = producer
        self.producer_failed = False
        logger.info("Replaced the Kafka producer after a failed delivery")

    def _update_pauses(self) -> None:
        limit = self.settings.buffer_max_records
        for partition, buffers in self.buffers.items():
            for side, topic in enumerate(self.topics):
                tp = TopicPartition(topic, partition)
                size = len(buffers.sides[side])
                if size >= limit and tp not in self.paused:
                    self.consumer.pause(tp)
                    self.paused.add(tp)
                elif size < limit // 2 and tp in self.paused:
                    self.consumer.resume(tp)
                    self.paused.discard(tp)

    def _update_gauges(self) -> None:
        now = self.clock.time()
        for partition in self.buffers:
            try:
                self.metrics.pending_impressions.labels(partition=str(partition)).set(
                    self.store.pending_count(partition)
                )
                watermark = self.machine.watermark(partition)
            except redis.exceptions.RedisError:
                return
            if watermark is not None:
                self.metrics.watermark_lag.labels(partition=str(partition)).set(now - watermark)
            for topic in self.topics:
                tp = TopicPartition(topic, partition)
                highwater = self.consumer.highwater(tp)
                # A position not known yet would be fetched from the broker.
                position = self.consumer.position(tp, timeout_ms=0)
                if highwater is not None and position is not None:
                    lag = max(0, highwater - position)
                    self.metrics.consumer_lag.labels(topic=topic, partition=str(partition)).set(lag)
