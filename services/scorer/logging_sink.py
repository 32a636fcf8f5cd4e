"""The served-impression log: each scored impression, produced to the impressions topic.

The request path only puts a record into a bounded in-memory queue, which
takes microseconds and never waits. One background thread encodes each
record as an :class:`~shared.events.Impression`, with exactly the features
that were scored and a :class:`~shared.events.ServedScore`, and hands it to
the Kafka producer, keyed by impression id and stamped with the event time.

The trade-off: scoring never waits for Kafka, so when Kafka is slow or down
the queue fills and new records are dropped. Each drop is counted by reason
and logged at most once every ``DROP_LOG_INTERVAL_SECONDS``. A dropped
impression is never labelled, so the trainer does not learn from it; the
other option, blocking requests until Kafka recovers, would take the ad or
recommendation server down with Kafka. Records still queued when the process
is killed are lost too; a graceful stop flushes them for up to
``close(timeout_s)`` seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from services.scorer.metrics import ScorerMetrics
from shared.clock import Clock, SystemClock
from shared.events import SCHEMA_VERSION, Impression, ServedScore
from shared.service import ExponentialBackoff

logger = logging.getLogger(__name__)

DROP_LOG_INTERVAL_SECONDS = 10.0
# How long the producer may block one send for metadata or buffer space. The
# queue in front of it takes up the slack, and drops are counted there.
PRODUCER_MAX_BLOCK_MS = 1000
# How long building the producer waits for a broker before the thread backs
# off and tries again; kafka-python 3.0 waits 30 s by default.
PRODUCER_BOOTSTRAP_TIMEOUT_MS = 5000
# How long a record may wait to be batched. Each wake-up of kafka-python's
# sender thread costs CPU in the scorer's process. At about 600 records/s,
# the producer took 425 us of CPU per record with 5 ms and 135 us with 50 ms
# (kafka-python 3.0.12, Tansu broker, on a 2-core machine).
PRODUCER_LINGER_MS = 50
_QUEUE_WAIT_SECONDS = 0.2


@dataclass(frozen=True, slots=True)
class ServedImpression:
    """A scored impression and its score, as the request path queues it."""

    impression_id: str
    event_time: float
    user_id: str | None
    item_id: str
    features: dict[str, Any]
    model_version: str
    arm: str
    probability: float
    baseline_probability: float | None
    shadow_probability: float | None = None

    def to_json(self) -> bytes:
        """Encode the impression as ``encode(self.to_impression())`` does, without validating it.

        The request model validated every field with the same types, and
        building the pydantic model again would cost more than the send.
        """
        served: dict[str, Any] = {
            "model_version": self.model_version,
            "arm": self.arm,
            "probability": self.probability,
        }
        if self.baseline_probability is not None:
            served["baseline_probability"] = self.baseline_probability
        if self.shadow_probability is not None:
            served["shadow_probability"] = self.shadow_probability

        event_time = dt.datetime.fromtimestamp(self.event_time, dt.UTC)
        # The keys in the order of the Impression fields, as encode() writes them.
        event: dict[str, Any] = {
            "type": "impression",
            "schema_version": SCHEMA_VERSION,
            "impression_id": self.impression_id,
            "event_time": event_time.isoformat().replace("+00:00", "Z"),
        }
        if self.user_id is not None:
            event["user_id"] = self.user_id
        event["item_id"] = self.item_id
        event["features"] = self.features
        event["served"] = served
        return orjson.dumps(event)

    def to_impression(self) -> Impression:
        """Build the impression event that the joiner reads, validated."""
        return Impression(
            impression_id=self.impression_id,
            event_time=dt.datetime.fromtimestamp(self.event_time, dt.UTC),
            user_id=self.user_id,
            item_id=self.item_id,
            features=self.features,
            served=ServedScore(
                model_version=self.model_version,
                arm=self.arm,
                probability=self.probability,
                baseline_probability=self.baseline_probability,
                shadow_probability=self.shadow_probability,
            ),
        )


class ImpressionSink(Protocol):
    """The destination of scored impressions, fed by the request path."""

    def offer(self, record: ServedImpression) -> bool:
        """Queue a record without waiting; return False when it was dropped."""
        ...

    def start(self) -> None:
        """Start sending in the background."""
        ...

    def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued for up to ``timeout_s`` seconds, then stop."""
        ...


class DisabledSink:
    """The sink used when impression logging is turned off: it accepts and drops nothing."""

    def offer(self, record: ServedImpression) -> bool:
        return True

    def start(self) -> None:
        pass

    def close(self, timeout_s: float = 5.0) -> None:
        pass


class _DropLog:
    """Log drops at most once per interval, with the number dropped since the last line."""

    def __init__(self, interval_s: float, clock: Clock) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.unlogged = 0
        self._last_logged: float | None = None
        self._lock = threading.Lock()

    def record(self, reason: str, detail: str) -> None:
        with self._lock:
            self.unlogged += 1
            now = self.clock.monotonic()
            if self._last_logged is not None and now - self._last_logged < self.interval_s:
                return
            dropped, self.unlogged, self._last_logged = self.unlogged, 0, now
        logger.warning(
            "Dropped %d served impression record(s) since the last report (latest reason %s: "
            "%s); scoring goes on, but dropped impressions are never learned from",
            dropped,
            reason,
            detail,
        )


class KafkaImpressionSink:
    """Produce served impressions to Kafka from a background thread, through a bounded queue.

    NOTE: kafka-python runs in the scorer's process, so its CPU time (about
    130 us per record at 50 ms linger) competes with request handling for
    the GIL and raises tail latency while logging. A producer in its own
    process, or a client that releases the GIL such as confluent-kafka,
    would remove that cost; neither is done here.
    """

    def __init__(
        self,
        producer_factory: Callable[[], KafkaProducer],
        topic: str,
        queue_size: int,
        metrics: ScorerMetrics,
        clock: Clock | None = None,
    ) -> None:
        self.producer_factory = producer_factory
        self.topic = topic
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self._queue: queue.Queue[ServedImpression] = queue.Queue(maxsize=queue_size)
        self._drops = _DropLog(DROP_LOG_INTERVAL_SECONDS, self.clock)
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._producer: KafkaProducer | None = None

    def offer(self, record: ServedImpression) -> bool:
        """Queue a record without waiting; count and drop it when the queue is full."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._drop("queue_full", f"{self._queue.maxsize} records are waiting for Kafka")
            return False
        return True

    def start(self) -> None:
        """Start the producer thread; the producer connects from there, with retries."""
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 5.0) -> None:
        """Send the queued records for up to ``timeout_s`` seconds, then close the producer.

        Records still queued at the deadline are counted as dropped.
        """
        self._drain_deadline = self.clock.monotonic() + timeout_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s + 1.0)
        left = self._queue.qsize()
        if left:
            self.metrics.impression_log_dropped.labels(reason="producer_unavailable").inc(left)
            logger.warning("Stopped with %d served impression record(s) not sent", left)

    @property
    def queued(self) -> int:
        """Records waiting in the queue."""
        return self._queue.qsize()

    def _run(self) -> None:
        producer = self._connect()
        if producer is None:
            return
        while True:
            self.metrics.impression_log_queue.set(self._queue.qsize())
            if self._stop.is_set() and (self._queue.empty() or self._past_drain_deadline()):
                break
            try:
                record = self._queue.get(timeout=_QUEUE_WAIT_SECONDS)
            except queue.Empty:
                continue
            self._send(producer, record)
        self._close_producer(producer)

    def _connect(self) -> KafkaProducer | None:
        backoff = ExponentialBackoff()
        while not self._stop.is_set():
            try:
                return self.producer_factory()
            except KafkaError as error:
                delay = backoff.next_delay()
                logger.warning(
                    "Kafka producer for %r unavailable (%s); served impressions queue up and "
                    "are dropped when the queue is full; retrying in %.1f s",
                    self.topic,
                    error,
                    delay,
                )
                self._stop.wait(delay)
        return None

    def _send(self, producer: KafkaProducer, record: ServedImpression) -> None:
        try:
            value = record.to_json()
        except orjson.JSONEncodeError as error:
            self._drop("invalid", str(error))
            return
        try:
            future = producer.send(
                self.topic,
                key=record.impression_id.encode(),
                value=value,
                timestamp_ms=int(record.event_time * 1000),
            )
        except KafkaError as error:
            self._drop("send_failed", str(error))
            return
        future.add_callback(self._on_delivered)
        future.add_errback(self._on_failed)

    def _on_delivered(self, _metadata: object) -> None:
        self.metrics.impression_log_sent.inc()

    def _on_failed(self, error: Exception) -> None:
        self._drop("delivery_failed", str(error))

    def _drop(self, reason: str, detail: str) -> None:
        self.metrics.impression_log_dropped.labels(reason=reason).inc()
        self._drops.record(reason, detail)

    def _past_drain_deadline(self) -> bool:
        deadline = self._drain_deadline
        return deadline is not None and self.clock.monotonic() >= deadline

    def _close_producer(self, producer: KafkaProducer) -> None:
        remaining = 1.0
        if self._drain_deadline is not None:
            remaining = max(0.5, self._drain_deadline - self.clock.monotonic())
        try:
            producer.flush(timeout=remaining)
        except KafkaError as error:
            logger.warning("Flushing served impressions failed: %s", error)
        producer.close(timeout=1.0)
