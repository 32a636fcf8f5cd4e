"""Joiner throughput against a pass-through consumer with the same client settings.

Both sides read the same events from an impressions and a clicks topic on a
real broker and commit after every poll.

joiner
    The ``Joiner`` that ``services.joiner.main.build_joiner`` builds, with
    its default settings: parse, event-time merge, the join in Redis,
    producing each labelled example with the broker's acknowledgement, and
    committing. It runs until every impression's example is acknowledged.
pass-through (reference)
    A consumer and a producer built with the same options, which produce one
    message per impression record (its bytes unchanged) to an output topic,
    wait for the acknowledgements and commit. Nothing is parsed, joined or
    stored in Redis.

Each consumer joins its group while the input topics are still empty. The
events are produced after that, so the clock runs from the first poll of the
events to the commit of the last one, without the group join. The rate is
input events (impressions and clicks) per second, and the ratio is joiner
rate over pass-through rate.

After the stream, the script produces one impression per partition, far
enough in event time past the last event to close every open window. These
closing impressions count as input events but yield no example.

Usage::

    python bench/joiner_throughput.py                       # generated stream, temporary servers
    python bench/joiner_throughput.py --events data/samples/obd-small.jsonl.gz --profile
    python bench/joiner_throughput.py --kafka-bootstrap 127.0.0.1:9092 \\
        --redis-url redis://127.0.0.1:7000/0

Against servers given by URL the script uses its own uniquely named topics,
consumer groups and Redis keys, and deletes its keys and topics after each
run. The consumer groups stay behind, empty.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import logging
import os
import platform
import pstats
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import kafka
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from services.joiner.app import Joiner
from services.joiner.main import build_joiner
from services.joiner.settings import JoinerSettings
from shared.events import Click, Impression, encode
from shared.kafka import make_consumer, make_producer
from shared.localstack import TEST_CONSUMER_SETTINGS, RedisServer, TansuBroker, create_topics
from shared.streams.generate import GeneratorSettings, generate
from shared.streams.produce import produce_events
from shared.streams.recorded import read_events

logger = logging.getLogger("bench.joiner_throughput")

PARTITIONS = 4
TARGET_RATIO = 0.6
# Bounds on waiting for the broker, so a broken broker or joiner ends the run.
GROUP_JOIN_TIMEOUT_SECONDS = 60.0
CONSUME_TIMEOUT_SECONDS = 600.0
CLOSING_ITEM_ID = "bench-window-closer"
# Consumer options that build_joiner sets, checked equal on both sides.
COMPARED_CONSUMER_OPTIONS = (
    "group_id",
    "enable_auto_commit",
    "auto_offset_reset",
    "partition_assignment_strategy",
    "session_timeout_ms",
    "heartbeat_interval_ms",
    "max_poll_interval_ms",
    "fetch_max_wait_ms",
    "fetch_min_bytes",
    "max_partition_fetch_bytes",
    "max_poll_records",
)
COMPARED_PRODUCER_OPTIONS = (
    "acks",
    "linger_ms",
    "batch_size",
    "compression_type",
    "max_in_flight_requests_per_connection",
    "retries",
)


# The stream.


@dataclass(frozen=True)
class Stream:
    """Input events in event-time order and the number of examples they must yield."""

    events: list[Impression | Click]
    expected_examples: int
    description: str

    @property
    def impressions(self) -> int:
        return sum(isinstance(event, Impression) for event in self.events)


def generated_stream(impressions: int, seed: int) -> Stream:
    """Return a generated stream; every impression id is unique, so each yields one example."""
    events, _ = generate(GeneratorSettings(seed=seed, impressions=impressions))
    event_list = list(events)
    clicks = len(event_list) - impressions
    return Stream(
        event_list,
        impressions,
        f"generated (seed {seed}): {impressions:,} impressions, {clicks:,} clicks",
    )


def recorded_stream(path: Path) -> Stream:
    """Return a recorded stream; a repeated impression id yields a single example."""
    events = list(read_events(path))
    impression_ids = {event.impression_id for event in events if isinstance(event, Impression)}
    impressions = sum(isinstance(event, Impression) for event in events)
    return Stream(
        events,
        len(impression_ids),
        f"{path}: {impressions:,} impressions, {len(events) - impressions:,} clicks",
    )


def closing_impressions(stream: Stream, settings: JoinerSettings) -> list[tuple[int, Impression]]:
    """Return one (partition, impression) per partition that closes every window left open."""
    last = max(event.ts for event in stream.events)
    close_at = last + settings.window_seconds + settings.allowed_lateness_seconds + 1.0
    event_time = dt.datetime.fromtimestamp(close_at, dt.UTC)
    return [
        (
            partition,
            Impression(
                impression_id=f"bench-close-{partition}",
                event_time=event_time,
                item_id=CLOSING_ITEM_ID,
            ),
        )
        for partition in range(PARTITIONS)
    ]


# Settings, topics and clean-up.


@dataclass
class Servers:
    """The Redis URL and Kafka bootstrap servers used, and the servers this script started."""

    redis_url: str
    kafka_bootstrap: str
    started: list[RedisServer | TansuBroker]

    def close(self) -> None:
        for server in self.started:
            if isinstance(server, TansuBroker):
                # Tansu 0.6.0 takes about 5 s to stop on SIGTERM while clients
                # are connected, and it keeps nothing on disk to lose.
                server.kill()
            server.close()


# The stream is produced before the joiner starts, so a poll that returns one
# topic's records first can carry the watermark hours of event time ahead.
# With the default retention the join would drop the impressions left behind
# as expired, so a run would skip their work. A retention longer than any
# bench stream keeps the work the same in every run.
BENCH_RETENTION_SECONDS = 30 * 86_400.0


def run_settings(servers: Servers, label: str) -> JoinerSettings:
    """Return default joiner settings with unique names, fast group timing and long retention."""
    run_id = f"{label}-{uuid.uuid4().hex[:8]}"
    return JoinerSettings(
        kafka_bootstrap_servers=servers.kafka_bootstrap,
        redis_url=servers.redis_url,
        topic_impressions=f"bench-impressions-{run_id}",
        topic_clicks=f"bench-clicks-{run_id}",
        topic_examples=f"bench-examples-{run_id}",
        topic_dead_letter=f"bench-dead-letter-{run_id}",
        joiner_group_id=f"bench-joiner-{run_id}",
        redis_namespace=f"octr-bench:{run_id}:join",
        metrics_port=0,
        session_timeout_ms=TEST_CONSUMER_SETTINGS["session_timeout_ms"],
        heartbeat_interval_ms=TEST_CONSUMER_SETTINGS["heartbeat_interval_ms"],
        max_poll_interval_ms=TEST_CONSUMER_SETTINGS["max_poll_interval_ms"],
        closed_retention_seconds=BENCH_RETENTION_SECONDS,
    )


def create_run_topics(settings: JoinerSettings) -> None:
    create_topics(
        settings.kafka_bootstrap_servers,
        {
            settings.topic_impressions: PARTITIONS,
            settings.topic_clicks: PARTITIONS,
            settings.topic_examples: PARTITIONS,
            settings.topic_dead_letter: 1,
        },
    )


def delete_run_topics(settings: JoinerSettings) -> None:
    """Delete one run's topics; a failure is logged, because the measurement is already taken."""
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    topics = [
        settings.topic_impressions,
        settings.topic_clicks,
        settings.topic_examples,
        settings.topic_dead_letter,
    ]
    try:
        admin.delete_topics(topics, timeout_ms=15_000)
    except KafkaError as error:
        logger.warning("Deleting the topics %s failed: %s; delete them by hand", topics, error)
    finally:
        admin.close()


def produce_stream(settings: JoinerSettings, stream: Stream) -> None:
    """Produce the events, then the closing impressions, as the ``produce`` command does."""
    producer = make_producer(settings)
    try:
        produce_events(producer, stream.events, settings.topic_impressions, settings.topic_clicks)
        for partition, impression in closing_impressions(stream, settings):
            producer.send(
                settings.topic_impressions,
                key=impression.impression_id.encode(),
                value=encode(impression),
                partition=partition,
                timestamp_ms=int(impression.ts * 1000),
            )
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)


def delete_keys(redis_url: str, namespace: str) -> None:
    """Delete every key of one run's join store."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if keys:
            client.unlink(*keys)
    finally:
        client.close()


def wait_for_assignment(poll: Callable[[], object], consumer: KafkaConsumer) -> None:
    """Poll the empty topics until the group gives the consumer its partitions."""
    deadline = time.monotonic() + GROUP_JOIN_TIMEOUT_SECONDS
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the consumer got no partitions within {GROUP_JOIN_TIMEOUT_SECONDS:.0f} s; "
                "check that the broker is up and the topics exist"
            )
        poll()
    # One more poll resets the positions of the new partitions to the beginning.
    poll()


def check_same_options(
    joiner: Joiner, consumer: KafkaConsumer, producer: KafkaProducer, group_id: str
) -> None:
    """Raise if the pass-through's clients differ from the joiner's in any compared option."""
    for name in COMPARED_CONSUMER_OPTIONS:
        expected = group_id if name == "group_id" else joiner.consumer.config[name]
        if consumer.config[name] != expected:
            raise RuntimeError(
                f"pass-through consumer option {name}={consumer.config[name]!r} differs from "
                f"the joiner's {expected!r}; update pass_through_clients to match build_joiner"
            )
    for name in COMPARED_PRODUCER_OPTIONS:
        if producer.config[name] != joiner.producer.config[name]:
            raise RuntimeError(
                f"pass-through producer option {name}={producer.config[name]!r} differs from "
                f"the joiner's {joiner.producer.config[name]!r}; update pass_through_clients"
            )


# Measurements.


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one measured run, and the CPU seconds this process used in it.

    The CPU time leaves out the broker and Redis, which run in their own
    processes, and time spent waiting for another process to get a core.
    """

    wall_seconds: float
    cpu_seconds: float


class Stopwatch:
    """Measure wall-clock and process CPU time from construction to ``stop``."""

    def __init__(self) -> None:
        self._wall_started = time.perf_counter()
        self._cpu_started = time.process_time()

    def stop(self) -> Timing:
        return Timing(
            time.perf_counter() - self._wall_started, time.process_time() - self._cpu_started
        )


def impressions_handled(registry: CollectorRegistry) -> float:
    """Count the impressions the joiner is done with: each has an example or expired.

    The bench produces the whole stream before the joiner starts, so event
    time is compressed: a poll that returns one topic's records before the
    other's can carry the watermark hours past an impression not read yet.
    The join drops such an impression as expired (see docs/join.md), so it
    never gets an example, and it counts here so that a run can finish.
    """
    total = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name == "octr_joiner_examples_emitted_total":
                total += sample.value
            elif (
                sample.name == "octr_joiner_join_outcomes_total"
                and sample.labels.get("outcome") == "impression_expired"
            ):
                total += sample.value
    return total


def joiner_timing(servers: Servers, stream: Stream, profiler: cProfile.Profile | None) -> Timing:
    """Time the real joiner from its first poll of the events to its last commit."""
    settings = run_settings(servers, "joiner")
    create_run_topics(settings)
    registry = CollectorRegistry()
    joiner = build_joiner(settings, registry)
    try:
        joiner.subscribe()
        wait_for_assignment(joiner.run_cycle, joiner.consumer)
        produce_stream(settings, stream)

        deadline = time.monotonic() + CONSUME_TIMEOUT_SECONDS
        if profiler is not None:
            profiler.enable()
        stopwatch = Stopwatch()
        while impressions_handled(registry) < stream.expected_examples:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the joiner handled {impressions_handled(registry):.0f} of "
                    f"{stream.expected_examples} impressions within {CONSUME_TIMEOUT_SECONDS:.0f} s"
                )
            joiner.run_cycle()
        timing = stopwatch.stop()
        if profiler is not None:
            profiler.disable()

        handled = impressions_handled(registry)
        if handled != stream.expected_examples:
            raise RuntimeError(
                f"the joiner handled {handled:.0f} impressions, expected "
                f"{stream.expected_examples}; the timing is invalid"
            )
        return timing
    finally:
        joiner.close()
        delete_keys(servers.redis_url, settings.redis_namespace)
        delete_run_topics(settings)


def pass_through_clients(settings: JoinerSettings) -> tuple[KafkaConsumer, KafkaProducer]:
    """Build a consumer and a producer with the options build_joiner uses."""
    consumer = make_consumer(
        settings,
        settings.joiner_group_id,
        partition_assignment_strategy=[RangePartitionAssignor],
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_poll_records=settings.max_poll_records,
    )
    return consumer, make_producer(settings)


def pass_through_timing(servers: Servers, stream: Stream, reference_joiner: Joiner) -> Timing:
    """Time consume, produce one message per impression, and commit, over the same events."""
    settings = run_settings(servers, "pass")
    create_run_topics(settings)
    consumer, producer = pass_through_clients(settings)
    check_same_options(reference_joiner, consumer, producer, settings.joiner_group_id)
    total = len(stream.events) + PARTITIONS

    def poll() -> dict:
        return consumer.poll(
            timeout_ms=settings.poll_timeout_ms, max_records=settings.max_poll_records
        )

    try:
        consumer.subscribe([settings.topic_impressions, settings.topic_clicks])
        wait_for_assignment(poll, consumer)
        produce_stream(settings, stream)

        consumed = 0
        deadline = time.monotonic() + CONSUME_TIMEOUT_SECONDS
        stopwatch = Stopwatch()
        while consumed < total:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the pass-through consumed {consumed} of {total} events")
            futures = []
            offsets: dict[TopicPartition, OffsetAndMetadata] = {}
            for tp, batch in poll().items():
                if tp.topic == settings.topic_impressions:
                    for record in batch:
                        futures.append(
                            producer.send(
                                settings.topic_examples, key=record.key, value=record.value
                            )
                        )
                offsets[tp] = OffsetAndMetadata(batch[-1].offset + 1, "", -1)
                consumed += len(batch)
            producer.flush(timeout=30)
            for future in futures:
                future.get(timeout=0)
            if offsets:
                consumer.commit(offsets)
        return stopwatch.stop()
    finally:
        consumer.close()
        producer.close(timeout=10)
        delete_run_topics(settings)


def settings_reference_joiner(servers: Servers) -> Joiner:
    """Build and close a joiner only to read the client options it uses; it never polls."""
    settings = run_settings(servers, "options")
    create_run_topics(settings)
    joiner = build_joiner(settings, CollectorRegistry())
    joiner.close()
    delete_run_topics(settings)
    return joiner


# Reporting.


def machine_description() -> str:
    """Return the CPU model, core count, OS and versions."""
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} logical CPUs, {platform.platform()}, "
        f"Python {platform.python_version()}, kafka-python {kafka.__version__}"
    )


def print_results(events: int, pass_through_runs: list[Timing], joiner_runs: list[Timing]) -> None:
    """Print median wall and CPU seconds, rates and ratios, and whether the target is met."""
    reference_wall = statistics.median(run.wall_seconds for run in pass_through_runs)
    reference_cpu = statistics.median(run.cpu_seconds for run in pass_through_runs)
    print(f"\n{events:,} input events on {PARTITIONS} partitions, median of {len(joiner_runs)}")
    print(
        f"{'measurement':44} {'wall s':>7} {'range':>11} {'events/s':>9} {'ratio':>6} "
        f"{'CPU s':>7} {'CPU ratio':>9}"
    )
    for name, runs in (
        ("pass-through (reference)", pass_through_runs),
        ("joiner (build_joiner), poll to last commit", joiner_runs),
    ):
        walls = [run.wall_seconds for run in runs]
        wall = statistics.median(walls)
        cpu = statistics.median(run.cpu_seconds for run in runs)
        spread = f"{min(walls):.2f}-{max(walls):.2f}"
        print(
            f"{name:44} {wall:7.2f} {spread:>11} {events / wall:9,.0f} "
            f"{reference_wall / wall:6.2f} {cpu:7.2f} {reference_cpu / cpu:9.2f}"
        )

    ratio = reference_wall / statistics.median(run.wall_seconds for run in joiner_runs)
    print(f"target: ratio >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'NOT met'}")


def print_profile(profiler: cProfile.Profile, lines: int) -> None:
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(lines)
    stats.sort_stats("cumulative").print_stats(lines)
    print("\nprofile of one joiner run (from the first poll of the events to the last commit)")
    print(stream.getvalue())


# Entry point.


def start_servers(args: argparse.Namespace) -> Servers:
    started: list[RedisServer | TansuBroker] = []
    redis_url = args.redis_url
    if redis_url is None:
        server = RedisServer()
        server.start()
        started.append(server)
        redis_url = server.url
    bootstrap = args.kafka_bootstrap
    if bootstrap is None:
        broker = TansuBroker()
        broker.start()
        started.append(broker)
        bootstrap = broker.bootstrap
    return Servers(redis_url, bootstrap, started)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the live joiner's events per second against a pass-through "
        "consumer and producer with the same client settings.",
    )

    parser.add_argument(
        "--events",
        type=Path,
        help="recorded stream (.jsonl or .jsonl.gz) to use instead of a generated one",
    )
    parser.add_argument(
        "--impressions",
        type=int,
        default=95_000,
        help="impressions of the generated stream; about 5 %% more clicks follow "
        "(default: %(default)s, about 100,000 events)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per measurement; the median is kept (default: %(default)s)",
    )

    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one more joiner run with cProfile and print the top functions",
    )
    parser.add_argument(
        "--profile-lines", type=int, default=30, help="functions listed per profile sort"
    )

    parser.add_argument(
        "--redis-url",
        help="Redis to use, such as redis://127.0.0.1:7000/0; default: a temporary redis-server",
    )
    parser.add_argument(
        "--kafka-bootstrap",
        help="Kafka bootstrap servers, such as 127.0.0.1:9092; default: a temporary Tansu",
    )

    args = parser.parse_args(argv)
    if args.impressions < 1_000:
        parser.error(f"--impressions must be at least 1000, got {args.impressions}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    stream = (
        recorded_stream(args.events)
        if args.events is not None
        else generated_stream(args.impressions, args.seed)
    )
    events = len(stream.events) + PARTITIONS
    print(f"machine: {machine_description()}")
    print(f"load average at start: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(f"stream: {stream.description}, plus {PARTITIONS} closing impressions")

    servers = start_servers(args)
    try:
        reference_joiner = settings_reference_joiner(servers)
        # Alternate the two measurements, so a change in background load
        # affects both instead of skewing one.
        pass_through_runs: list[Timing] = []
        joiner_runs: list[Timing] = []
        for _ in range(args.repeat):
            pass_through_runs.append(pass_through_timing(servers, stream, reference_joiner))
            joiner_runs.append(joiner_timing(servers, stream, None))
        profiler = None
        if args.profile:
            profiler = cProfile.Profile()
            joiner_timing(servers, stream, profiler)
    finally:
        servers.close()

    print(f"load average at end: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print_results(events, pass_through_runs, joiner_runs)
    if profiler is not None:
        print_profile(profiler, args.profile_lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
