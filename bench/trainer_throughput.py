"""Trainer throughput against a bare River loop on the same labelled examples.

Every measurement has its reference measured in the same run, and the ratio
is reference time over trainer time, so 1.0 would mean the trainer costs
nothing beyond River itself. The examples come from the known-truth generator
(``shared.streams.generate``); the label is the drawn click.

memory
    ``Trainer.run_cycle`` fed pre-encoded example bytes by an in-memory
    stand-in for the consumer: parse, de-duplication, learning with the
    baseline and the metrics, and a signed snapshot in Redis every
    ``snapshot_every_examples``. It runs once with the real
    ``RedisDeduplicator`` and once with an in-process no-op one, which shows
    what Redis costs. The reference is the bare River loop:
    ``predict_proba_one`` and ``learn_one`` of the same model on the same
    feature dicts, prepared before the clock starts.
topic
    The trainer built by ``services.trainer.main.build_trainer`` consuming
    the examples from a topic on a real broker, from its first poll to the
    commit after its last snapshot. The reference is a consumer with the same
    settings reading the same records, looking up each record's prepared
    features by key and running the bare River loop on them.
sampling
    Negative downsampling at ``--sampling-rate`` with each correction, and
    learning every example for comparison. It reports impressions/s through
    the in-memory trainer loop and through its learning step alone
    (``Trainer._learn_one`` on parsed examples). It also reports the
    normalised entropy of progressive predictions over the second half of
    the stream.

Usage::

    python bench/trainer_throughput.py                  # temporary Tansu and redis-server
    python bench/trainer_throughput.py --only memory --examples 50000 --profile memory
    python bench/trainer_throughput.py --kafka-bootstrap 127.0.0.1:9092 \\
        --redis-url redis://127.0.0.1:7000/0

Against servers given by URL the script uses its own uniquely named topics,
consumer groups and Redis keys, and deletes its keys and topics after each
run. The consumer groups stay behind, empty.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import functools
import io
import logging
import os
import platform
import pstats
import secrets
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
import river
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from services.trainer.app import Trainer
from services.trainer.dedup import RedisDeduplicator, Sighting
from services.trainer.main import build_trainer
from services.trainer.metrics import TrainerMetrics
from services.trainer.settings import TrainerSettings
from shared.events import Impression, LabeledExample, LabelSource, ServedScore, encode
from shared.kafka import make_consumer, make_producer
from shared.learn.models import REGISTRY, build_model
from shared.localstack import TEST_CONSUMER_SETTINGS, RedisServer, TansuBroker, create_topics
from shared.metrics.binary import BinaryMetrics
from shared.registry import ModelRegistry
from shared.snapshots import SigningKeys
from shared.streams.generate import GeneratorSettings, generate

logger = logging.getLogger("bench.trainer_throughput")

PARTS = ("memory", "topic", "sampling")
PARTITIONS = 4
# The joiner's attribution window; it only sets label delays and decision times here.
WINDOW_SECONDS = 600.0
# Served scores logged with each impression, as a scorer would log them.
SERVED_MODEL_VERSION = "bench-1"
SERVED_BASELINE_PROBABILITY = 0.05
# Bounds on waiting for the broker, so a broken broker ends the run.
GROUP_JOIN_TIMEOUT_SECONDS = 60.0
CONSUME_TIMEOUT_SECONDS = 600.0
TARGETS = {"memory": 0.9, "topic": 0.8, "sampling_impressions_per_second": 100_000}
SAMPLING_NE_TOLERANCE = 0.01


# The examples.


@dataclass(frozen=True, slots=True)
class BenchExample:
    """One labelled example, its record key and value, and the truth behind its label."""

    example: LabeledExample
    key: bytes
    value: bytes
    true_probability: float


def build_examples(count: int, seed: int, served: bool) -> list[BenchExample]:
    """Generate ``count`` impressions and label each with its drawn click.

    A clicked impression is decided at its click, the others when the window
    closes. With ``served``, each impression carries the scores a scorer
    would have logged (the true probability and a fixed baseline), so the
    trainer also updates its served-score metrics and drift profile.
    """
    events, truth = generate(GeneratorSettings(seed=seed, impressions=count))
    truth_by_id = {record.impression_id: record for record in truth}
    examples = []
    for event in events:
        if not isinstance(event, Impression):
            continue
        record = truth_by_id[event.impression_id]
        impression = event
        if served:
            impression = event.model_copy(
                update={
                    "served": ServedScore(
                        model_version=SERVED_MODEL_VERSION,
                        probability=record.true_probability,
                        baseline_probability=SERVED_BASELINE_PROBABILITY,
                    )
                }
            )
        delay = record.click_delay_seconds if record.clicked else None
        if delay is None:
            delay = WINDOW_SECONDS
        example = LabeledExample(
            impression=impression,
            label=int(record.clicked),
            label_delay_seconds=delay,
            label_source=LabelSource.CLICK if record.clicked else LabelSource.WINDOW_CLOSED,
            decided_at=impression.event_time + dt.timedelta(seconds=delay),
        )
        examples.append(
            BenchExample(
                example, event.impression_id.encode(), encode(example), record.true_probability
            )
        )
    return examples


def feature_rows(examples: Sequence[BenchExample]) -> list[tuple[dict, bool]]:
    """Return the (features, label) pairs the bare River loop learns."""
    return [
        (item.example.impression.learning_features(), bool(item.example.label)) for item in examples
    ]


# Stand-ins for Kafka and Redis.


@dataclass(frozen=True, slots=True)
class MemoryRecord:
    """The fields of a ``kafka.consumer.fetcher.ConsumerRecord`` that the trainer reads."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes


class MemoryConsumer:
    """A stand-in for ``KafkaConsumer`` that serves prepared records from memory.

    Records are spread over the partitions in turn, and each poll returns up
    to ``max_records`` records of one partition, the next partition each time.
    """

    def __init__(self, topic: str, examples: Sequence[BenchExample], partitions: int) -> None:
        self.topics = [TopicPartition(topic, partition) for partition in range(partitions)]
        self.records: dict[TopicPartition, list[MemoryRecord]] = {tp: [] for tp in self.topics}
        for index, item in enumerate(examples):
            tp = self.topics[index % partitions]
            offset = len(self.records[tp])
            self.records[tp].append(MemoryRecord(topic, tp.partition, offset, item.key, item.value))
        self.positions = {tp: 0 for tp in self.topics}
        self.committed: dict[TopicPartition, int] = {}
        self._next_partition = 0

    def poll(self, timeout_ms: int = 0, max_records: int | None = None):
        for _ in self.topics:
            tp = self.topics[self._next_partition]
            self._next_partition = (self._next_partition + 1) % len(self.topics)
            start = self.positions[tp]
            records = self.records[tp]
            if start < len(records):
                batch = records[start : start + (max_records or len(records))]
                self.positions[tp] = start + len(batch)
                return {tp: batch}
        return {}

    @property
    def exhausted(self) -> bool:
        """True when every record has been returned by ``poll``."""
        return all(self.positions[tp] >= len(self.records[tp]) for tp in self.topics)

    def assignment(self) -> set[TopicPartition]:
        return set(self.topics)

    def highwater(self, tp: TopicPartition) -> int:
        return len(self.records[tp])

    def position(self, tp: TopicPartition) -> int:
        return self.positions[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def commit(self, offsets) -> None:
        for tp, offset in offsets.items():
            self.committed[tp] = offset.offset

    def close(self) -> None:
        pass


class NoDeduplicator:
    """An in-process stand-in for ``RedisDeduplicator`` that learns every example."""

    def first_sightings(self, sightings: Sequence[Sighting], read_through=None) -> list[bool]:
        return [True] * len(sightings)


# Settings and clean-up.


@dataclass
class Servers:
    """The Redis URL and Kafka bootstrap servers used, and the servers this script started."""

    redis_url: str
    kafka_bootstrap: str | None
    started: list[RedisServer | TansuBroker]

    def close(self) -> None:
        for server in self.started:
            if isinstance(server, TansuBroker):
                # Tansu 0.6.0 takes about 5 s to stop on SIGTERM while clients
                # are connected, and it keeps nothing on disk to lose.
                server.kill()
            server.close()


@dataclass(frozen=True)
class BenchSetup:
    """The servers, snapshot signing key and model that every measured run shares."""

    servers: Servers
    signing_key: str
    model: str


class RunNames:
    """Unique topic, group and Redis key names for one measured run."""

    def __init__(self, label: str) -> None:
        self.run_id = f"{label}-{uuid.uuid4().hex[:8]}"
        self.key_prefix = f"octr-bench:{self.run_id}"

    @property
    def topic(self) -> str:
        return f"bench-examples-{self.run_id}"

    @property
    def group(self) -> str:
        return f"bench-trainer-{self.run_id}"


def trainer_settings(
    setup: BenchSetup,
    names: RunNames,
    sampling_rate: float = 1.0,
    correction: str = "recalibrate",
) -> TrainerSettings:
    """Return the trainer's default settings with this run's names, model and fast group timing."""
    servers = setup.servers
    kafka = (
        {}
        if servers.kafka_bootstrap is None
        else {"kafka_bootstrap_servers": servers.kafka_bootstrap}
    )
    return TrainerSettings(
        **kafka,
        redis_url=servers.redis_url,
        model=setup.model,
        topic_examples=names.topic,
        trainer_group_id=names.group,
        model_slot=names.run_id[:64],
        registry_namespace=f"{names.key_prefix}:models",
        dedup_namespace=f"{names.key_prefix}:dedup",
        signing_keys=SecretStr(f"bench:{setup.signing_key}"),
        signing_key_id="bench",
        metrics_port=0,
        negative_sampling_rate=sampling_rate,
        negative_sampling_correction=correction,
        session_timeout_ms=TEST_CONSUMER_SETTINGS["session_timeout_ms"],
        heartbeat_interval_ms=TEST_CONSUMER_SETTINGS["heartbeat_interval_ms"],
        max_poll_interval_ms=TEST_CONSUMER_SETTINGS["max_poll_interval_ms"],
    )


def delete_keys(client: redis.Redis, prefix: str) -> None:
    """Delete every key of one run, in batches."""
    batch: list[bytes] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def memory_trainer(
    settings: TrainerSettings,
    client: redis.Redis,
    consumer: MemoryConsumer,
    deduplicate_in_redis: bool,
) -> tuple[Trainer, CollectorRegistry]:
    """Build a Trainer with the in-memory consumer, a real registry and the chosen deduplicator."""
    keys = SigningKeys.parse(settings.signing_keys, settings.signing_key_id)
    deduplicator = (
        RedisDeduplicator(client, settings.dedup_namespace, settings.dedup_horizon_seconds)
        if deduplicate_in_redis
        else NoDeduplicator()
    )
    registry = CollectorRegistry()
    trainer = Trainer(
        settings,
        consumer,
        ModelRegistry(
            client, keys, namespace=settings.registry_namespace, retain=settings.retain_snapshots
        ),
        deduplicator,
        TrainerMetrics(registry),
    )
    return trainer, registry


def check_learned(registry: CollectorRegistry, expected: int, run_name: str) -> None:
    """Raise unless learned plus sampled-out examples equal ``expected``, with no duplicates."""
    learned = sum(
        registry.get_sample_value("octr_trainer_examples_learned_total", {"label": label}) or 0.0
        for label in ("0", "1")
    )
    sampled_out = registry.get_sample_value("octr_trainer_negatives_sampled_out_total") or 0.0
    duplicates = registry.get_sample_value("octr_trainer_duplicates_dropped_total") or 0.0
    if learned + sampled_out != expected or duplicates:
        raise RuntimeError(
            f"{run_name}: the trainer learned {learned:.0f}, sampled out {sampled_out:.0f} and "
            f"dropped {duplicates:.0f} as duplicates of {expected} examples, so the timing "
            "is invalid; check the de-duplication namespace and the consumer stand-in"
        )


# Measurements.


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one measured run, and the CPU seconds this process used in it.

    The CPU time leaves out Redis and the broker, which run in their own
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


def bare_river_timing(model_name: str, rows: Sequence[tuple[dict, bool]]) -> Timing:
    """Time predict_proba_one and learn_one of a fresh model over prepared rows."""
    model = build_model(model_name)
    stopwatch = Stopwatch()
    for x, y in rows:
        model.predict_proba_one(x)
        model.learn_one(x, y)
    return stopwatch.stop()


def trainer_memory_timing(
    setup: BenchSetup,
    examples: Sequence[BenchExample],
    deduplicate_in_redis: bool,
    sampling_rate: float = 1.0,
    correction: str = "recalibrate",
    profiler: cProfile.Profile | None = None,
) -> Timing:
    """Time the trainer's cycles over in-memory records, with the final snapshot.

    With ``profiler``, profile the timed part only.
    """
    names = RunNames("memory")
    settings = trainer_settings(setup, names, sampling_rate, correction)
    client = redis.Redis.from_url(settings.redis_url)
    consumer = MemoryConsumer(names.topic, examples, PARTITIONS)
    trainer, registry = memory_trainer(settings, client, consumer, deduplicate_in_redis)
    try:
        if profiler is not None:
            profiler.enable()
        stopwatch = Stopwatch()
        while not consumer.exhausted:
            trainer.run_cycle()
        if trainer.unpublished:
            trainer.publish()
        timing = stopwatch.stop()
        if profiler is not None:
            profiler.disable()
        check_learned(registry, len(examples), "memory run")
        return timing
    finally:
        delete_keys(client, names.key_prefix)
        client.close()


def learning_step_timing(
    setup: BenchSetup,
    examples: Sequence[BenchExample],
    sampling_rate: float,
    correction: str,
) -> Timing:
    """Time ``Trainer._learn_one`` alone on parsed examples: sampling, learning and metrics."""
    names = RunNames("step")
    settings = trainer_settings(setup, names, sampling_rate, correction)
    client = redis.Redis.from_url(settings.redis_url)
    trainer, registry = memory_trainer(
        settings, client, MemoryConsumer(names.topic, [], 1), deduplicate_in_redis=False
    )
    parsed = [item.example for item in examples]
    try:
        stopwatch = Stopwatch()
        for example in parsed:
            trainer._learn_one(example)
        timing = stopwatch.stop()
        check_learned(registry, len(examples), "learning step")
        return timing
    finally:
        client.close()


@dataclass(frozen=True)
class SamplingQuality:
    """Progressive normalised entropy over the second half of the stream."""

    normalized_entropy: float
    bayes_normalized_entropy: float
    mean_prediction: float
    mean_true_probability: float


def sampling_quality(
    setup: BenchSetup,
    examples: Sequence[BenchExample],
    sampling_rate: float,
    correction: str,
) -> SamplingQuality:
    """Score each impression of the second half just before the trainer's learning step."""
    names = RunNames("quality")
    settings = trainer_settings(setup, names, sampling_rate, correction)
    client = redis.Redis.from_url(settings.redis_url)
    trainer, _ = memory_trainer(
        settings, client, MemoryConsumer(names.topic, [], 1), deduplicate_in_redis=False
    )
    model_metrics, bayes_metrics = BinaryMetrics(), BinaryMetrics()
    evaluated_from = len(examples) // 2
    try:
        for index, item in enumerate(examples):
            example = item.example
            if index >= evaluated_from:
                features = example.impression.learning_features()
                prediction = trainer.learner.model.predict_proba_one(features).get(True, 0.0)
                model_metrics.update(prediction, example.label)
                bayes_metrics.update(item.true_probability, example.label)
            trainer._learn_one(example)
    finally:
        client.close()

    model_report, bayes_report = model_metrics.report(), bayes_metrics.report()
    tail = examples[evaluated_from:]
    return SamplingQuality(
        normalized_entropy=model_report.normalized_entropy,
        bayes_normalized_entropy=bayes_report.normalized_entropy,
        mean_prediction=model_report.mean_prediction,
        mean_true_probability=statistics.fmean(item.true_probability for item in tail),
    )


def consumer_options(settings: TrainerSettings) -> dict:
    """Return the consumer settings that ``build_trainer`` passes, for a matching reference."""
    return {
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "max_poll_records": settings.max_poll_records,
    }


def wait_for_assignment(poll: Callable[[], None], consumer: KafkaConsumer) -> None:
    """Poll until the group gives the consumer its partitions."""
    deadline = time.monotonic() + GROUP_JOIN_TIMEOUT_SECONDS
    while not consumer.assignment():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the consumer got no partitions within {GROUP_JOIN_TIMEOUT_SECONDS:.0f} s; "
                "check that the broker is up and the topic exists"
            )
        poll()
    # One more poll resets the positions of the new partitions to the beginning.
    poll()


def delete_topic(bootstrap: str, topic: str) -> None:
    """Delete one run's topic; a failure is logged, because the measurement is already taken."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.delete_topics([topic], timeout_ms=15_000)
    except KafkaError as error:
        logger.warning("Deleting the topic %s failed: %s; delete it by hand", topic, error)
    finally:
        admin.close()


def produce_examples(settings: TrainerSettings, examples: Sequence[BenchExample]) -> None:
    """Produce the example records keyed by impression id, as the joiner does."""
    producer = make_producer(settings)
    try:
        for item in examples:
            producer.send(settings.topic_examples, key=item.key, value=item.value)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)


def trainer_topic_timing(setup: BenchSetup, examples: Sequence[BenchExample]) -> Timing:
    """Time the real trainer from its first poll of the examples to its last commit."""
    names = RunNames("topic")
    settings = trainer_settings(setup, names)
    assert setup.servers.kafka_bootstrap is not None
    create_topics(setup.servers.kafka_bootstrap, {names.topic: PARTITIONS})
    registry = CollectorRegistry()
    trainer = build_trainer(settings, registry)
    try:
        trainer.subscribe()
        # Join the group while the topic is empty, so the timing leaves the join out.
        wait_for_assignment(trainer.run_cycle, trainer.consumer)
        produce_examples(settings, examples)

        deadline = time.monotonic() + CONSUME_TIMEOUT_SECONDS
        stopwatch = Stopwatch()
        while (registry.get_sample_value("octr_trainer_examples_consumed_total") or 0.0) < len(
            examples
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the trainer did not consume {len(examples)} examples in time")
            trainer.run_cycle()
        if trainer.unpublished:
            trainer.publish()
        timing = stopwatch.stop()

        check_learned(registry, len(examples), "topic run")
        return timing
    finally:
        trainer.close()
        delete_topic(setup.servers.kafka_bootstrap, names.topic)
        client = redis.Redis.from_url(settings.redis_url)
        delete_keys(client, names.key_prefix)
        client.close()


def reference_topic_timing(setup: BenchSetup, examples: Sequence[BenchExample]) -> Timing:
    """Time a consumer with the trainer's settings feeding the bare River loop."""
    names = RunNames("reference")
    settings = trainer_settings(setup, names)
    assert setup.servers.kafka_bootstrap is not None
    create_topics(setup.servers.kafka_bootstrap, {names.topic: PARTITIONS})
    rows = dict(zip((item.key for item in examples), feature_rows(examples), strict=True))
    model = build_model(settings.model)
    consumer = make_consumer(settings, names.group, **consumer_options(settings))

    def poll() -> dict:
        return consumer.poll(
            timeout_ms=settings.poll_timeout_ms, max_records=settings.max_poll_records
        )

    try:
        consumer.subscribe([names.topic])
        wait_for_assignment(poll, consumer)
        produce_examples(settings, examples)

        consumed = 0
        deadline = time.monotonic() + CONSUME_TIMEOUT_SECONDS
        stopwatch = Stopwatch()
        while consumed < len(examples):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the reference did not consume {len(examples)} records")
            for batch in poll().values():
                for record in batch:
                    x, y = rows[record.key]
                    model.predict_proba_one(x)
                    model.learn_one(x, y)
                consumed += len(batch)
        return stopwatch.stop()
    finally:
        consumer.close()
        delete_topic(setup.servers.kafka_bootstrap, names.topic)


# Reporting.


def machine_description() -> str:
    """Return the CPU model, core count, OS and Python version."""
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
        f"Python {platform.python_version()}, River {river.__version__}"
    )


def interleaved_timings(
    measures: dict[str, Callable[[], Timing]], repeat: int
) -> dict[str, list[Timing]]:
    """Run every measurement once per round, for ``repeat`` rounds, and return their timings.

    Interleaving spreads a change in background load over all measurements
    instead of skewing the ones that happened to run during it.
    """
    timings: dict[str, list[Timing]] = {name: [] for name in measures}
    for _ in range(repeat):
        for name, measure in measures.items():
            timings[name].append(measure())
    return timings


def median_wall(timings: Sequence[Timing]) -> float:
    return statistics.median(timing.wall_seconds for timing in timings)


def median_cpu(timings: Sequence[Timing]) -> float:
    return statistics.median(timing.cpu_seconds for timing in timings)


TIMING_HEADER = ("measurement", "wall s", "range", "examples/s", "ratio", "CPU s", "CPU ratio")


def timing_rows(
    timings: dict[str, list[Timing]], count: int, reference: str
) -> list[tuple[str, ...]]:
    """Return rows of median wall seconds, range, rate, ratio, and median CPU seconds and ratio."""
    reference_wall = median_wall(timings[reference])
    reference_cpu = median_cpu(timings[reference])
    rows = []
    for name, runs in timings.items():
        walls = [run.wall_seconds for run in runs]
        wall, cpu = median_wall(runs), median_cpu(runs)
        rows.append(
            (
                name,
                f"{wall:.2f}",
                f"{min(walls):.2f}-{max(walls):.2f}",
                f"{count / wall:,.0f}",
                f"{reference_wall / wall:.2f}",
                f"{cpu:.2f}",
                f"{reference_cpu / cpu:.2f}",
            )
        )
    return rows


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    print(f"\n{title}")
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    print(
        "  ".join(
            cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
            for i, cell in enumerate(header)
        )
    )
    for row in rows:
        print(
            "  ".join(
                cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            )
        )


def met(value: float, target: float) -> str:
    return "met" if value >= target else "NOT met"


def run_memory(args, setup, examples, rows) -> None:
    count = len(examples)
    reference = "bare River loop (reference)"
    with_redis = "trainer loop, Redis de-duplication"
    timings = interleaved_timings(
        {
            reference: functools.partial(bare_river_timing, setup.model, rows),
            with_redis: functools.partial(trainer_memory_timing, setup, examples, True),
            "trainer loop, no-op de-duplication": functools.partial(
                trainer_memory_timing, setup, examples, False
            ),
        },
        args.repeat,
    )
    print_table(
        f"memory: {count:,} pre-encoded examples, median of {args.repeat}",
        TIMING_HEADER,
        timing_rows(timings, count, reference),
    )
    ratio = median_wall(timings[reference]) / median_wall(timings[with_redis])
    print(f"target: ratio >= {TARGETS['memory']} with Redis: {met(ratio, TARGETS['memory'])}")


def run_topic(args, setup, examples) -> None:
    count = len(examples)
    reference = "raw consume + bare River loop (reference)"
    trainer = "trainer (build_trainer), poll to last commit"
    timings = interleaved_timings(
        {
            reference: functools.partial(reference_topic_timing, setup, examples),
            trainer: functools.partial(trainer_topic_timing, setup, examples),
        },
        args.repeat,
    )
    print_table(
        f"topic: {count:,} examples on {PARTITIONS} partitions, median of {args.repeat}",
        TIMING_HEADER,
        timing_rows(timings, count, reference),
    )
    ratio = median_wall(timings[reference]) / median_wall(timings[trainer])
    print(f"target: ratio >= {TARGETS['topic']}: {met(ratio, TARGETS['topic'])}")


def run_sampling(args, setup, examples) -> None:
    count = len(examples)
    modes = [("all examples", 1.0, "recalibrate")] + [
        (f"rate {args.sampling_rate:g}, {correction}", args.sampling_rate, correction)
        for correction in ("weight", "recalibrate")
    ]
    measures: dict[str, Callable[[], Timing]] = {}
    for name, rate, correction in modes:
        measures[f"{name}: loop"] = functools.partial(
            trainer_memory_timing, setup, examples, True, rate, correction
        )
        measures[f"{name}: step"] = functools.partial(
            learning_step_timing, setup, examples, rate, correction
        )
    timings = interleaved_timings(measures, args.repeat)

    rows = []
    ne_gaps = {}
    all_quality = None
    for name, rate, correction in modes:
        quality = sampling_quality(setup, examples, rate, correction)
        all_quality = all_quality or quality
        ne_gaps[name] = quality.normalized_entropy / all_quality.normalized_entropy - 1
        loop, step = timings[f"{name}: loop"], timings[f"{name}: step"]
        rows.append(
            (
                name,
                f"{count / median_wall(loop):,.0f}",
                f"{count / median_cpu(loop):,.0f}",
                f"{count / median_wall(step):,.0f}",
                f"{count / median_cpu(step):,.0f}",
                f"{quality.normalized_entropy:.4f}",
                f"{ne_gaps[name]:+.2%}",
                f"{quality.mean_prediction / quality.mean_true_probability:.3f}",
            )
        )
    print_table(
        f"sampling: {count:,} impressions from memory, median of {args.repeat}; NE over the "
        f"second half (Bayes-optimal NE {all_quality.bayes_normalized_entropy:.4f})",
        (
            "mode",
            "loop imp/s",
            "loop imp/CPU s",
            "step imp/s",
            "step imp/CPU s",
            "NE",
            "NE vs all",
            "mean pred/true",
        ),
        rows,
    )

    target = TARGETS["sampling_impressions_per_second"]
    for name, _, _ in modes[1:]:
        loop_rate = count / median_wall(timings[f"{name}: loop"])
        step_rate = count / median_wall(timings[f"{name}: step"])
        ne_met = abs(ne_gaps[name]) <= SAMPLING_NE_TOLERANCE
        print(
            f"target {name}: >= {target:,} imp/s through the loop: {met(loop_rate, target)}; "
            f"through the learning step: {met(step_rate, target)}; NE within "
            f"{SAMPLING_NE_TOLERANCE:.0%} of all examples: {'met' if ne_met else 'NOT met'}"
        )


def print_profile(args, setup, examples) -> None:
    """Profile one in-memory trainer run with Redis de-duplication and print the top functions."""
    rate = args.sampling_rate if args.profile == "sampling" else 1.0
    profiler = cProfile.Profile()
    timing = trainer_memory_timing(setup, examples, True, rate, "recalibrate", profiler)
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(args.profile_lines)
    stats.sort_stats("cumulative").print_stats(args.profile_lines)
    print(
        f"\nprofile of the in-memory trainer loop at rate {rate:g} "
        f"({timing.wall_seconds:.2f} s with cProfile)"
    )
    print(stream.getvalue())


# Entry point.


def start_servers(args, parts: Sequence[str]) -> Servers:
    started: list[RedisServer | TansuBroker] = []
    redis_url = args.redis_url
    if redis_url is None:
        server = RedisServer()
        server.start()
        started.append(server)
        redis_url = server.url
    bootstrap = args.kafka_bootstrap
    if bootstrap is None and "topic" in parts:
        broker = TansuBroker()
        broker.start()
        started.append(broker)
        bootstrap = broker.bootstrap
    return Servers(redis_url, bootstrap, started)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the trainer's throughput against a bare River loop, "
        "from memory and from a topic, and negative downsampling's speed and accuracy.",
    )

    parser.add_argument(
        "--examples", type=int, default=100_000, help="generated examples (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per measurement; the median is kept (default: %(default)s)",
    )
    parser.add_argument(
        "--only", choices=PARTS, action="append", help="run only this part; may be repeated"
    )
    parser.add_argument(
        "--model",
        default=TrainerSettings.model_fields["model"].default,
        help="model from the registry, for the trainer and the bare River loop "
        "(default: the trainer's, %(default)s)",
    )

    parser.add_argument(
        "--sampling-rate",
        type=float,
        default=0.1,
        help="share of negatives learned in the sampling part (default: %(default)s)",
    )
    parser.add_argument(
        "--no-served",
        action="store_true",
        help="leave the served scores off the impressions, which skips the trainer's "
        "served-score metrics and drift profile",
    )
    parser.add_argument(
        "--profile",
        choices=("memory", "sampling"),
        help="also profile one in-memory trainer run with cProfile, learning every example "
        "(memory) or at --sampling-rate (sampling), and print the top functions",
    )
    parser.add_argument(
        "--profile-lines", type=int, default=25, help="functions listed per profile sort"
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
    if args.examples < 1_000:
        parser.error(f"--examples must be at least 1000, got {args.examples}")
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.model not in REGISTRY:
        parser.error(
            f"unknown --model {args.model!r}; choose one of: {', '.join(sorted(REGISTRY))}"
        )
    if not 0 < args.sampling_rate <= 1:
        parser.error(f"--sampling-rate must be in (0, 1], got {args.sampling_rate}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parts = args.only or list(PARTS)

    examples = build_examples(args.examples, args.seed, served=not args.no_served)
    rows = feature_rows(examples)
    clicks = sum(item.example.label for item in examples)
    print(f"machine: {machine_description()}")
    print(f"load average at start: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    print(
        f"stream: {len(examples):,} generated examples (seed {args.seed}), "
        f"{clicks / len(examples):.1%} clicks, served scores {'off' if args.no_served else 'on'}; "
        f"model {args.model}"
    )

    servers = start_servers(args, parts)
    setup = BenchSetup(servers, secrets.token_hex(32), args.model)
    try:
        if "memory" in parts:
            run_memory(args, setup, examples, rows)
        if "topic" in parts:
            run_topic(args, setup, examples)
        if "sampling" in parts:
            run_sampling(args, setup, examples)
        if args.profile:
            print_profile(args, setup, examples)
    finally:
        servers.close()
    print(f"\nload average at end: {' '.join(f'{load:.2f}' for load in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
