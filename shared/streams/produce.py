"""Publish a recorded stream into Kafka in event-time order, as fast as possible or paced.

Impressions go to the impressions topic and clicks to the clicks topic, both
keyed by ``impression_id`` so that co-partitioning holds, with the event time
as the record timestamp.

Replaying history faster than real time compresses minutes of event time into
milliseconds, so one topic's records could become visible to the joiner ahead
of the other's by more than the allowed lateness. To prevent that, the
producer waits for acknowledgements before sending an event when the other
topic still has unacknowledged events more than ``max_skew_seconds`` of event
time older.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from kafka import KafkaProducer

from shared.clock import Clock, SystemClock
from shared.events import Click, Impression, encode

logger = logging.getLogger(__name__)


@dataclass
class ProduceSummary:
    """The counts of one produce run."""

    impressions: int = 0
    clicks: int = 0
    flushes: int = 0
    wall_seconds: float = 0.0

    def __str__(self) -> str:
        rate = (self.impressions + self.clicks) / self.wall_seconds if self.wall_seconds else 0.0
        return (
            f"produced {self.impressions} impressions and {self.clicks} clicks in "
            f"{self.wall_seconds:.1f} s ({rate:,.0f} events/s, {self.flushes} ordering flushes)"
        )


def produce_events(
    producer: KafkaProducer,
    events: Iterable[Impression | Click],
    impressions_topic: str,
    clicks_topic: str,
    speed: float | None = None,
    max_skew_seconds: float = 30.0,
    clock: Clock | None = None,
    on_event: Callable[[], None] | None = None,
) -> ProduceSummary:
    """Send events in the order given, paced at ``speed`` times real time or unpaced if None."""
    clock = clock or SystemClock()
    summary = ProduceSummary()
    started = clock.monotonic()
    first_event_time: float | None = None
    # Event time of the oldest unacknowledged event per topic.
    oldest_unacked: dict[str, float | None] = {impressions_topic: None, clicks_topic: None}

    for event in events:
        topic = impressions_topic if event.type == "impression" else clicks_topic
        other = clicks_topic if topic == impressions_topic else impressions_topic
        event_time = event.ts

        if first_event_time is None:
            first_event_time = event_time
        if speed is not None:
            due = started + (event_time - first_event_time) / speed
            wait = due - clock.monotonic()
            if wait > 0:
                clock.sleep(wait)

        other_oldest = oldest_unacked[other]
        if other_oldest is not None and other_oldest < event_time - max_skew_seconds:
            producer.flush()
            summary.flushes += 1
            oldest_unacked = {impressions_topic: None, clicks_topic: None}
        if oldest_unacked[topic] is None:
            oldest_unacked[topic] = event_time

        producer.send(
            topic,
            key=event.impression_id.encode(),
            value=encode(event),
            timestamp_ms=int(event_time * 1000),
        )
        if event.type == "impression":
            summary.impressions += 1
        else:
            summary.clicks += 1
        if on_event is not None:
            on_event()

    producer.flush()
    summary.wall_seconds = clock.monotonic() - started
    return summary
