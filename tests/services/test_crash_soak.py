"""Crash soak: kill -9 the joiner and the trainer at random moments of a recorded stream.

The bundled sample (60,000 impressions and their clicks) is produced first.
The joiner and the trainer then work through it, and each is killed with
SIGKILL at random points of its own progress and started again at once.
After the stream drains, the (impression_id, label) pairs that reached
learning must equal offline replay's, and the newest snapshot must count each
of them exactly once.

The seed comes from ONLINE_CTR_SOAK_SEED, or is drawn fresh. The test prints
it with the kill plan, and every failure message repeats it. A seed reproduces
the kill plan, not the instruction each process was running when it died.
Run with ``-s`` to see the summary of kills, recovery times and duplicates.
"""

from __future__ import annotations

import gzip
import os
import random
import signal
import statistics
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
from kafka import TopicPartition
from kafka.admin import KafkaAdminClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.services.conftest import DATA_PARTITIONS, ServiceProcess, wait_until
from tests.services.joiner.test_joiner_live import SAMPLE, ExampleReader, produce, replay_labels
from tests.services.test_pipeline_live import learned_labels, newest_snapshot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED_VARIABLE = "ONLINE_CTR_SOAK_SEED"
KILLS_PER_SERVICE = 4
# Kills are planned between these shares of a service's progress, one in each
# equal slice, so that they spread over the stream and leave data to process.
EARLIEST_KILL, LATEST_KILL = 0.05, 0.85
POLL_SECONDS = 0.25
# Upper bound from the services' first start until the stream has drained.
SOAK_TIMEOUT_SECONDS = 150
# The drain check scans every de-duplication marker, so it runs at most this often.
LABEL_COUNT_INTERVAL_SECONDS = 2.0
# Once both services have read everything, the idle timeout of 2 s closes the last
# windows within seconds. A label count that stays short for this long has stalled.
STALL_SECONDS = 20.0
LISTED_IDS = 20


def plan_kills(rng: random.Random) -> list[float]:
    """Draw one kill point, as a share of progress, in each equal slice of the kill range."""
    width = (LATEST_KILL - EARLIEST_KILL) / KILLS_PER_SERVICE
    return [
        round(rng.uniform(EARLIEST_KILL + k * width, EARLIEST_KILL + (k + 1) * width), 3)
        for k in range(KILLS_PER_SERVICE)
    ]


def scrape(process: ServiceProcess) -> list[Sample] | None:
    """Return the samples of a service's /metrics endpoint, or None while it does not respond."""
    port = process.env["ONLINE_CTR_METRICS_PORT"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            body = response.read().decode()
    except OSError:
        return None
    return [sample for family in text_string_to_metric_families(body) for sample in family.samples]


def sample_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """Return the sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for sample in samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def joiner_duplicates(samples: list[Sample]) -> float:
    """Return the events the join recognised as read before, or repeated in the input.

    An impression read again after its record was forgotten counts as expired.
    """
    outcomes = ("impression_duplicate", "impression_expired", "click_duplicate")
    return sum(
        sample_sum(samples, "octr_joiner_join_outcomes_total", outcome=outcome)
        for outcome in outcomes
    )


def trainer_duplicates(samples: list[Sample]) -> float:
    """Return the examples the trainer dropped because an earlier copy was already learned."""
    return sample_sum(samples, "octr_trainer_duplicates_dropped_total")


def describe_difference(expected: set, actual: set, subject: str) -> str:
    """Describe the missing and extra pairs of ``actual``, listing at most LISTED_IDS of each."""
    missing, extra = sorted(expected - actual), sorted(actual - expected)
    return (
        f"{subject}: {len(actual)} pairs, replay decided {len(expected)}. "
        f"{len(missing)} missing, first {missing[:LISTED_IDS]}; "
        f"{len(extra)} extra, first {extra[:LISTED_IDS]}"
    )


def describe_records(reader: ExampleReader, differing: set[tuple[str, int]]) -> str:
    """List the examples topic's records of the first LISTED_IDS differing impressions."""
    ids = sorted({impression_id for impression_id, _ in differing})[:LISTED_IDS]
    records = {impression_id: [] for impression_id in ids}
    for impression_id, label, source in reader.examples:
        if impression_id in records:
            records[impression_id].append(f"{label} ({source})")
    return "".join(
        f"\n  {impression_id}: {', '.join(found) or 'no record'}"
        for impression_id, found in records.items()
    )


def summarise(seconds: list[float]) -> str:
    if not seconds:
        return "none measured"
    return f"median {statistics.median(seconds):.1f} s, max {max(seconds):.1f} s"


class CommitProbe:
    """Read the committed offsets of the joiner's and the trainer's consumer groups.

    End offsets are not read here. For the latest offset, Tansu 0.6 returns the
    base offset of the partition's last batch, which is short of the high
    watermark that fetches report.
    """

    def __init__(self, bootstrap: str, env: dict[str, str]) -> None:
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        input_topics = (env["ONLINE_CTR_TOPIC_IMPRESSIONS"], env["ONLINE_CTR_TOPIC_CLICKS"])
        self.partitions = {
            "joiner": [
                TopicPartition(topic, partition)
                for topic in input_topics
                for partition in range(DATA_PARTITIONS)
            ],
            "trainer": [
                TopicPartition(env["ONLINE_CTR_TOPIC_EXAMPLES"], partition)
                for partition in range(DATA_PARTITIONS)
            ],
        }
        self.groups = {
            "joiner": env["ONLINE_CTR_JOINER_GROUP_ID"],
            "trainer": env["ONLINE_CTR_TRAINER_GROUP_ID"],
        }

    def committed(self, service: str) -> int:
        """Return the sum of the service's committed offsets, counting 0 where none exists."""
        group = self.groups[service]
        offsets = self.admin.list_group_offsets({group: self.partitions[service]})[group]
        return sum(max(0, committed.offset) for committed in offsets.values())

    def close(self) -> None:
        self.admin.close()


def read_examples_topic(bootstrap: str, topic: str, rerun: str) -> ExampleReader:
    """Read the examples topic from the start until every partition is at its high watermark."""
    reader = ExampleReader(bootstrap, topic)

    def caught_up() -> bool:
        reader.poll()
        assignment = reader.consumer.assignment()
        return len(assignment) == DATA_PARTITIONS and all(
            reader.consumer.highwater(tp) is not None
            and reader.consumer.position(tp) >= reader.consumer.highwater(tp)
            for tp in assignment
        )

    wait_until(caught_up, timeout=60, message=f"{rerun}: reading the examples topic back")
    return reader


@dataclass
class Lifetime:
    """One process of a service, from its start until it is killed or stopped."""

    process: ServiceProcess
    started_at: float
    committed_at_start: int
    # Seconds from the start until the process reported a consumed record on /metrics.
    consuming_after: float | None = None
    # Seconds from the start until its group's committed offsets passed committed_at_start.
    committing_after: float | None = None
    # Last scraped values of the process's counters, which start at 0 in each process.
    consumed: float = 0.0
    duplicates: float = 0.0
    # Last scraped consumer lag by topic, if the metric has that label, and partition.
    lags: dict[tuple[str, str], float] = field(default_factory=dict)

    def records_read(self) -> int:
        """Return how many records the process has read, counted from its starting offsets.

        A process starts at its group's committed offsets. The trainer starts at
        its newest snapshot's positions, which it commits after storing the
        snapshot. If that commit failed, this count is short.
        """
        return self.committed_at_start + int(self.consumed)


@dataclass
class Kill:
    """A SIGKILL with its planned point and the progress and time at which it happened."""

    planned_share: float
    read_share: float
    seconds_into_soak: float
    # The joiner's committed input records, or the labels that reached the trainer,
    # as a share of the whole stream when the process died.
    finished_share: float | None = None


class SoakedService:
    """A service under the soak, with its processes, its kill plan and the kills done so far."""

    def __init__(
        self,
        name: str,
        start_service: Callable[..., ServiceProcess],
        env: dict[str, str],
        plan: list[float],
        consumed_metric: str,
        lag_metric: str,
        count_duplicates: Callable[[list[Sample]], float],
    ) -> None:
        self.name = name
        self.start_service = start_service
        self.env = env
        self.plan = plan
        self.consumed_metric = consumed_metric
        self.lag_metric = lag_metric
        self.count_duplicates = count_duplicates
        self.lifetimes: list[Lifetime] = []
        self.kills: list[Kill] = []

    @property
    def current(self) -> Lifetime:
        return self.lifetimes[-1]

    def launch(self, committed: int) -> None:
        process = self.start_service([self.name], self.env, name=self.name)
        self.lifetimes.append(Lifetime(process, time.monotonic(), committed))

    def observe(self, committed: int) -> None:
        """Scrape the running process and note when it consumes and commits again."""
        lifetime = self.current
        elapsed = time.monotonic() - lifetime.started_at
        samples = scrape(lifetime.process)
        if samples is not None:
            lifetime.consumed = sample_sum(samples, self.consumed_metric)
            lifetime.duplicates = self.count_duplicates(samples)
            lifetime.lags = {
                (sample.labels.get("topic", ""), sample.labels["partition"]): sample.value
                for sample in samples
                if sample.name == self.lag_metric
            }
            if lifetime.consuming_after is None and lifetime.consumed > 0:
                lifetime.consuming_after = elapsed
        if lifetime.committing_after is None and committed > lifetime.committed_at_start:
            lifetime.committing_after = elapsed

    def kill_due(self, total: int) -> bool:
        """Return True when the process is consuming and has read the next planned share."""
        if len(self.kills) == len(self.plan) or self.current.consuming_after is None:
            return False
        return self.current.records_read() >= self.plan[len(self.kills)] * total

    def kill(self, total: int, soak_started: float) -> Kill:
        """Send SIGKILL to the running process and record the kill."""
        process = self.current.process
        process.kill()
        assert process.process is not None
        assert process.process.returncode == -signal.SIGKILL, (
            f"the {self.name} was not killed by SIGKILL: exit status "
            f"{process.process.returncode}\n{process.log()[-3000:]}"
        )
        kill = Kill(
            planned_share=self.plan[len(self.kills)],
            read_share=self.current.records_read() / total,
            seconds_into_soak=time.monotonic() - soak_started,
        )
        self.kills.append(kill)
        print(
            f"killed the {self.name} at {kill.seconds_into_soak:.1f} s: planned at "
            f"{kill.planned_share} of its input, read {kill.read_share:.3f}"
        )
        return kill

    def restarts(self) -> list[Lifetime]:
        return self.lifetimes[1:]

    def duplicates(self) -> float:
        """Return the duplicates counted over all processes, as last scraped before each kill."""
        return sum(lifetime.duplicates for lifetime in self.lifetimes)

    def log_tail(self) -> str:
        return f"\n--- {self.name} ---\n" + "\n".join(self.current.process.log().splitlines()[-30:])


def test_crash_soak_loses_nothing(
    live_env,
    start_service,
    redis_client,
    kafka_broker,
    record_property,
) -> None:
    test_started = time.monotonic()
    seed = int(os.environ.get(SEED_VARIABLE) or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    rerun = f"soak seed {seed}, rerun with {SEED_VARIABLE}={seed}"
    joiner_plan, trainer_plan = plan_kills(rng), plan_kills(rng)
    print(
        f"\n{rerun}\nplanned kills: joiner at {joiner_plan} of the input records read, "
        f"trainer at {trainer_plan} of replay's label count in example records read"
    )
    record_property("soak_seed", seed)

    with ThreadPoolExecutor(max_workers=1) as pool:
        produced = pool.submit(produce, SAMPLE, live_env)
        expected = replay_labels(SAMPLE)
        produced.result()
    assert len(expected) >= 50_000, f"{rerun}: the sample gave only {len(expected)} labels"
    # Each line of the sample is one event, produced as one record.
    with gzip.open(SAMPLE, "rt") as lines:
        input_records = sum(1 for _ in lines)

    namespace = live_env["ONLINE_CTR_DEDUP_NAMESPACE"]
    joiner = SoakedService(
        "joiner",
        start_service,
        live_env,
        joiner_plan,
        consumed_metric="octr_joiner_events_consumed_total",
        lag_metric="octr_joiner_consumer_lag_records",
        count_duplicates=joiner_duplicates,
    )
    trainer = SoakedService(
        "trainer",
        start_service,
        live_env,
        trainer_plan,
        consumed_metric="octr_trainer_examples_consumed_total",
        lag_metric="octr_trainer_consumer_lag_records",
        count_duplicates=trainer_duplicates,
    )
    services = (joiner, trainer)

    probe = CommitProbe(kafka_broker.bootstrap, live_env)
    soak_started = time.monotonic()
    joiner.launch(committed=0)
    trainer.launch(committed=0)
    deadline = soak_started + SOAK_TIMEOUT_SECONDS
    next_label_count = 0.0
    labels_seen = 0
    stalled_since: float | None = None
    progress = "nothing measured yet"
    # Stays empty unless the soak times out or stalls. The labels are compared even
    # then, because their difference usually explains why.
    drain_failure = ""
    drained = False
    try:
        while not drained:
            if time.monotonic() >= deadline:
                drain_failure = (
                    f"the stream did not drain within {SOAK_TIMEOUT_SECONDS} s; {progress}"
                    + "".join(service.log_tail() for service in services)
                )
                break
            committed = {service.name: probe.committed(service.name) for service in services}
            for service in services:
                assert service.current.process.is_running(), (
                    f"{rerun}: the {service.name} exited by itself" + service.log_tail()
                )
                service.observe(committed[service.name])

            if joiner.kill_due(input_records):
                kill = joiner.kill(input_records, soak_started)
                # The dead process cannot commit, so this is where it stopped.
                stopped_at = probe.committed("joiner")
                kill.finished_share = stopped_at / input_records
                assert stopped_at < input_records, (
                    f"{rerun}: joiner kill {len(joiner.kills)} was not mid-stream: "
                    f"all {input_records} input records were committed"
                )
                joiner.launch(stopped_at)

            if trainer.kill_due(len(expected)):
                kill = trainer.kill(len(expected), soak_started)
                labels_seen = len(learned_labels(redis_client, namespace))
                kill.finished_share = labels_seen / len(expected)
                assert 0 < labels_seen < len(expected), (
                    f"{rerun}: trainer kill {len(trainer.kills)} was not mid-stream: "
                    f"{labels_seen} of {len(expected)} labels had reached it"
                )
                trainer.launch(probe.committed("trainer"))

            # The stream has drained when the joiner has committed every input record,
            # the trainer reports no lag on any partition, and every label has reached
            # learning. A lag of 0 is measured against the trainer's last fetch, which is
            # why the labels are counted too.
            trainer_lags = trainer.current.lags
            caught_up = (
                committed["joiner"] == input_records
                and len(trainer_lags) == DATA_PARTITIONS
                and not any(trainer_lags.values())
            )
            if caught_up and time.monotonic() >= next_label_count:
                next_label_count = time.monotonic() + LABEL_COUNT_INTERVAL_SECONDS
                counted = len(learned_labels(redis_client, namespace))
                drained = counted >= len(expected)
                if counted != labels_seen or stalled_since is None:
                    stalled_since = time.monotonic()
                labels_seen = counted
            elif not caught_up:
                stalled_since = None
            progress = (
                f"kills done: joiner {len(joiner.kills)}, trainer {len(trainer.kills)}; "
                f"joiner committed {committed['joiner']} of {input_records} input records; "
                f"trainer lag by partition {trainer_lags}; at the last count "
                f"{labels_seen} of {len(expected)} labels had reached the trainer"
            )
            if stalled_since is not None and time.monotonic() - stalled_since > STALL_SECONDS:
                drain_failure = (
                    f"the stream stalled for {STALL_SECONDS:.0f} s with both services caught "
                    f"up; {progress}" + "".join(service.log_tail() for service in services)
                )
                break
            if not drained:
                time.sleep(POLL_SECONDS)
        soak_seconds = time.monotonic() - soak_started
        for service in services:
            service.observe(probe.committed(service.name))
    finally:
        probe.close()

    assert trainer.current.process.stop() == 0, f"{rerun}\n{trainer.current.process.log()}"
    assert joiner.current.process.stop() == 0, f"{rerun}\n{joiner.current.process.log()}"

    reader = read_examples_topic(
        kafka_broker.bootstrap, live_env["ONLINE_CTR_TOPIC_EXAMPLES"], rerun
    )
    learned = learned_labels(redis_client, namespace)
    assert learned == expected, (
        f"{rerun}: "
        + describe_difference(expected, learned, "labels that reached learning")
        + describe_records(reader, expected ^ learned)
        + (f"\nAlso, {drain_failure}" if drain_failure else "")
    )
    assert not drain_failure, f"{rerun}: {drain_failure}"
    for service in services:
        assert len(service.kills) == KILLS_PER_SERVICE, (
            f"{rerun}: the stream drained after {len(service.kills)} of "
            f"{KILLS_PER_SERVICE} planned {service.name} kills"
        )
    metadata, _ = newest_snapshot(redis_client, live_env["ONLINE_CTR_REGISTRY_NAMESPACE"])
    assert metadata.examples_seen == len(expected), (
        f"{rerun}: the newest snapshot learned {metadata.examples_seen} examples, replay "
        f"decided {len(expected)}; a difference means an example was lost or learned twice"
    )
    produced = reader.labels()
    assert produced == expected, (
        f"{rerun}: "
        + describe_difference(expected, produced, "labels the joiner produced")
        + describe_records(reader, expected ^ produced)
    )
    example_copies = len(reader.examples) - len(set(reader.examples))
    # Copies on the topic and drops by the trainer need not match. A copy read by
    # two processes is dropped twice, and one read before a kill may be missed by
    # the last scrape. Only the counters' sign is certain.
    for number, lifetime in enumerate(trainer.lifetimes):
        assert lifetime.duplicates >= 0, (
            f"{rerun}: trainer process {number} reported {lifetime.duplicates} duplicates"
        )

    recovery = {
        f"{service.name}_{measure}_restart_s": [
            None
            if getattr(lifetime, f"{measure}_after") is None
            else round(getattr(lifetime, f"{measure}_after"), 2)
            for lifetime in service.restarts()
        ]
        for service in services
        for measure in ("consuming", "committing")
    }
    summary = {
        "soak_seed": seed,
        **{
            f"{service.name}_kills": [
                {
                    "planned": kill.planned_share,
                    "read": round(kill.read_share, 3),
                    "finished": round(kill.finished_share or 0.0, 3),
                    "at_s": round(kill.seconds_into_soak, 1),
                }
                for kill in service.kills
            ]
            for service in services
        },
        **recovery,
        "trainer_duplicates_dropped": int(trainer.duplicates()),
        "joiner_events_read_again": int(joiner.duplicates()),
        "example_records": len(reader.examples),
        "example_extra_copies": example_copies,
        "soak_seconds": round(soak_seconds, 1),
        "test_seconds": round(time.monotonic() - test_started, 1),
    }
    print("crash soak summary:")
    for key, value in summary.items():
        record_property(key, value)
        print(f"  {key}: {value}")
    for key, values in recovery.items():
        print(f"  {key}: {summarise([value for value in values if value is not None])}")
