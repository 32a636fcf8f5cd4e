"""Measure the Redis memory that RedisJoinStore uses per pending impression.

Stores N pending impressions with 20 features each through the store, as the
joiner would, then reports the bytes each one costs in Redis next to the size
of its serialised JSON (``shared.events.encode``)::

    python bench/redis_memory.py                       # a temporary redis-server
    python bench/redis_memory.py --redis-url redis://127.0.0.1:7000 --impressions 50000

Two measures are printed: ``MEMORY USAGE ... SAMPLES 0`` summed over the
partition's keys (exact for those keys), and the change in ``used_memory``
from ``INFO memory`` (includes allocator and dictionary overheads, and any
other client's writes on a shared server). Against a server given with
``--redis-url`` the script writes only keys under its own namespace and
deletes them before it exits.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import redis

from shared.events import Impression, encode
from shared.join.redis_store import RedisJoinStore
from shared.join.store import ChangeSet, ImpressionRecord, RecordState
from shared.localstack import RedisServer

logger = logging.getLogger("bench.redis_memory")

PARTITION = 0
WINDOW_SECONDS = 600.0
BATCH_SIZE = 500
START_TIME = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class Measurement:
    """Memory of N pending impressions, in bytes."""

    impressions: int
    json_bytes_total: int
    key_bytes: dict[str, int]
    used_memory_delta: int

    @property
    def json_bytes_per_impression(self) -> float:
        return self.json_bytes_total / self.impressions

    @property
    def key_bytes_per_impression(self) -> float:
        return sum(self.key_bytes.values()) / self.impressions

    @property
    def used_memory_per_impression(self) -> float:
        return self.used_memory_delta / self.impressions


def build_impressions(count: int, seed: int) -> Iterator[Impression]:
    """Yield impressions with 20 features of mixed types, one every 10 ms of event time.

    The features imitate a ranking log: hashed user and item attributes,
    short categories, scores, counters and flags.
    """
    rng = random.Random(seed)
    for index in range(count):
        features: dict[str, str | int | float | bool] = {}
        for k in range(6):
            features[f"hashed_{k}"] = f"{rng.getrandbits(128):032x}"
        for k in range(4):
            features[f"category_{k}"] = f"c{rng.randrange(1000)}"
        for k in range(5):
            features[f"score_{k}"] = rng.random()
        for k in range(3):
            features[f"count_{k}"] = rng.randrange(10_000)
        for k in range(2):
            features[f"flag_{k}"] = rng.random() < 0.5

        yield Impression(
            impression_id=f"{rng.getrandbits(128):032x}",
            event_time=START_TIME + dt.timedelta(milliseconds=10 * index),
            user_id=f"u{rng.randrange(1_000_000)}",
            item_id=f"i{rng.randrange(100_000)}",
            features=features,
        )


def _key_bytes(client: redis.Redis, keys: list[str]) -> dict[str, int]:
    # SAMPLES 0 makes Redis count every element instead of estimating from 5.
    return {key: int(client.memory_usage(key, samples=0) or 0) for key in keys}


def _used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def measure(client: redis.Redis, impressions: int, seed: int) -> Measurement:
    """Store ``impressions`` pending impressions in a fresh namespace and measure them."""
    namespace = f"octr:bench:{uuid.uuid4().hex[:8]}"
    store = RedisJoinStore(client, namespace=namespace)
    keys = store.keys_of(PARTITION)
    used_before = _used_memory(client)
    json_bytes_total = 0

    try:
        batch: dict[str, ImpressionRecord] = {}
        max_event_time = 0.0
        for impression in build_impressions(impressions, seed):
            json_bytes_total += len(encode(impression))
            deadline = impression.ts + WINDOW_SECONDS
            batch[impression.impression_id] = ImpressionRecord(
                impression, RecordState.PENDING, deadline
            )
            max_event_time = impression.ts
            if len(batch) == BATCH_SIZE:
                store.commit(PARTITION, ChangeSet(max_event_time=max_event_time, upserts=batch))
                batch = {}
        if batch:
            store.commit(PARTITION, ChangeSet(max_event_time=max_event_time, upserts=batch))

        stored = store.pending_count(PARTITION)
        if stored != impressions:
            raise RuntimeError(
                f"pending_count returned {stored} after storing {impressions} pending "
                f"impressions in namespace {namespace!r}, so the measurement is invalid"
            )
        used_after = _used_memory(client)
        key_bytes = _key_bytes(client, keys)
    finally:
        client.delete(*keys)

    return Measurement(impressions, json_bytes_total, key_bytes, used_after - used_before)


def format_report(result: Measurement, redis_version: str) -> str:
    """Return the measurement as a plain-text table."""
    per = result.impressions
    json_size = result.json_bytes_per_impression
    rows = [("impression JSON (encode)", json_size, 1.0)]
    for key, size in result.key_bytes.items():
        if size:
            name = key.rsplit(":", 1)[-1]
            rows.append((f"MEMORY USAGE {name}", size / per, size / per / json_size))
    rows.append(
        (
            "MEMORY USAGE, all keys",
            result.key_bytes_per_impression,
            result.key_bytes_per_impression / json_size,
        )
    )
    rows.append(
        (
            "INFO used_memory delta",
            result.used_memory_per_impression,
            result.used_memory_per_impression / json_size,
        )
    )

    lines = [
        f"{result.impressions} pending impressions, 20 features each, Redis {redis_version}",
        "",
        f"{'measure':<28} {'bytes/impression':>17} {'x JSON':>8}",
        f"{'-' * 28} {'-' * 17} {'-' * 8}",
    ]
    for label, bytes_per_impression, ratio in rows:
        lines.append(f"{label:<28} {bytes_per_impression:>17.1f} {ratio:>8.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Measure the Redis memory RedisJoinStore uses per pending impression with "
            "20 features, against the size of the impression's JSON."
        )
    )
    parser.add_argument(
        "--redis-url",
        help=(
            "Redis server to measure on, such as redis://127.0.0.1:7000; the script writes "
            "only its own keys and deletes them. Default: start a temporary redis-server "
            "on a free loopback port."
        ),
    )
    parser.add_argument(
        "--impressions",
        type=int,
        default=10_000,
        help="number of pending impressions to store (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=1, help="seed of the generated impressions (default: 1)"
    )
    args = parser.parse_args(argv)
    if args.impressions < 1:
        parser.error(f"--impressions must be at least 1, got {args.impressions}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    server: RedisServer | None = None
    url = args.redis_url
    if url is None:
        server = RedisServer()
        server.start()
        url = server.url
    client = redis.Redis.from_url(url)

    try:
        redis_version = client.info("server")["redis_version"]
        logger.info("storing %d pending impressions on %s", args.impressions, url)
        result = measure(client, args.impressions, args.seed)
    finally:
        client.close()
        if server is not None:
            server.close()

    print(format_report(result, redis_version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
