"""De-duplication of labelled examples across redeliveries and restarts.

The joiner delivers at least once, so an example can reach the trainer
twice: a second time from the joiner's outbox after a crash, at a later
offset. The trainer also re-reads its own records after a restart, from the
offsets stored in its newest snapshot. The first must be dropped, the second
must be learned again, because the restored model has not seen it.

Each example's first sighting is stored in Redis as
``<namespace>:seen:{<dedup key>}`` = ``<topic>/<partition>/<offset>`` with a
TTL of the horizon. ``SET ... NX GET`` returns the earlier value in the same
call: none means new, our own position means a replay of the same record, and
any other position means a duplicate.

A replay is learned again only below the positions the running trainer has
read. A rebalance that finds no committed offsets, as after a broker lost its
groups, resets the consumer to offsets this process has read already, and the
model in memory contains those records.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import redis

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Sighting:
    """The read position of an example: its dedup key and record position."""

    dedup_key: str
    topic: str
    partition: int
    offset: int

    @property
    def position(self) -> bytes:
        """The record position as stored in Redis."""
        return f"{self.topic}/{self.partition}/{self.offset}".encode()


class RedisDeduplicator:
    """Decide, per batch in one round trip, which examples are seen for the first time."""

    def __init__(self, client: redis.Redis, namespace: str, horizon_seconds: int) -> None:
        if horizon_seconds < 1:
            raise ValueError(f"de-duplication horizon must be at least 1 s, got {horizon_seconds}")
        self.client = client
        self.namespace = namespace
        self.horizon_seconds = horizon_seconds

    def key(self, dedup_key: str) -> str:
        """Return the Redis key that records an example's first sighting."""
        return f"{self.namespace}:seen:{{{dedup_key}}}"

    def first_sightings(
        self, sightings: Sequence[Sighting], read_through: Mapping[int, int] | None = None
    ) -> list[bool]:
        """Return, per sighting, whether to learn it: it is new, or a replay not yet learned.

        ``read_through`` maps a partition to the offset below which the caller
        has read every record, or restored it from a snapshot. A replay of the
        same record below that offset is already in the caller's model.
        """
        if not sightings:
            return []
        read_through = read_through or {}
        pipeline = self.client.pipeline(transaction=False)
        for sighting in sightings:
            pipeline.set(
                self.key(sighting.dedup_key),
                sighting.position,
                nx=True,
                ex=self.horizon_seconds,
                get=True,
            )
        previous = pipeline.execute()

        decisions = []
        seen_in_batch: set[str] = set()
        for sighting, earlier in zip(sightings, previous, strict=True):
            replay = earlier == sighting.position and sighting.offset >= read_through.get(
                sighting.partition, 0
            )
            first = earlier is None or replay
            # Two copies in one batch: both SETs saw no earlier value, or the
            # second saw the first's position; keep only the first copy.
            if sighting.dedup_key in seen_in_batch:
                first = False
            seen_in_batch.add(sighting.dedup_key)
            decisions.append(first)
        return decisions
