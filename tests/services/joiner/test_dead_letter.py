"""Invalid records go to the dead-letter topic, counted by reason, and valid ones go on.

The unit tests drive ``Joiner._buffer`` with the bad-event corpus and a
recording producer. The integration test produces the corpus, interleaved
with valid events, to real topics and runs the real joiner process.
"""

from __future__ import annotations

import datetime as dt
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.future import Future
from prometheus_client import CollectorRegistry

from services.joiner.app import MAX_DEAD_LETTER_BYTES, Joiner
from services.joiner.metrics import JoinerMetrics
from services.joiner.settings import JoinerSettings
from shared.clock import ManualClock
from shared.events import Click, Impression, encode
from shared.join import InMemoryJoinStore
from shared.kafka import (
    HEADER_ERROR,
    HEADER_REASON,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_TOPIC,
    headers_dict,
)
from shared.localstack import find_free_port
from tests.fixtures.bad_events import BadEvent, build_corpus
from tests.services.conftest import wait_until
from tests.services.joiner.test_joiner_live import ExampleReader

TOPICS = {"impressions": "impressions", "clicks": "clicks"}
DEAD_LETTER_TOPIC = "dead-letter"


@dataclass
class Record:
    """The fields of a kafka-python ConsumerRecord that the joiner reads."""

    offset: int
    key: bytes | None
    value: bytes | None


class RecordingProducer:
    """A producer stand-in that keeps every send and completes its future at once."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, topic, value=None, key=None, headers=None):
        self.sent.append({"topic": topic, "value": value, "key": key, "headers": headers})
        future = Future()
        future.success(None)
        return future


def build_joiner(now: float) -> tuple[Joiner, RecordingProducer, CollectorRegistry]:
    settings = JoinerSettings(
        topic_impressions=TOPICS["impressions"],
        topic_clicks=TOPICS["clicks"],
        topic_dead_letter=DEAD_LETTER_TOPIC,
    )
    producer = RecordingProducer()
    registry = CollectorRegistry()
    joiner = Joiner(
        settings,
        consumer=None,
        producer=producer,
        store=InMemoryJoinStore(),
        metrics=JoinerMetrics(registry),
        clock=ManualClock(now),
    )
    return joiner, producer, registry


def valid_impression(number: int, event_time: float) -> tuple[bytes, bytes]:
    impression = Impression(
        impression_id=f"valid-{number}", event_time=event_time, item_id="item-1"
    )
    return impression.impression_id.encode(), encode(impression)


def test_buffer_dead_letters_corpus_and_keeps_valid() -> None:
    now = time.time()
    corpus = build_corpus()
    joiner, producer, registry = build_joiner(now)
    batches: dict[str, list[Record]] = {"impressions": [], "clicks": []}
    kinds_by_offset: dict[tuple[str, int], BadEvent] = {}
    for number, entry in enumerate(corpus):
        key, value = valid_impression(number, now - 3600 + number)
        batches["impressions"].append(Record(len(batches["impressions"]), key, value))
        offset = len(batches[entry.topic])
        batches[entry.topic].append(Record(offset, entry.key, entry.value))
        kinds_by_offset[(TOPICS[entry.topic], offset)] = entry

    for side, records in batches.items():
        joiner._buffer(TopicPartition(TOPICS[side], 0), records)

    impressions = joiner.buffers[0].sides[0]
    assert [b.event.impression_id for b in impressions] == [
        f"valid-{n}" for n in range(len(corpus))
    ]
    assert len(joiner.buffers[0].sides[1]) == 0
    assert len(producer.sent) == len(corpus)
    seen = set()
    for sent in producer.sent:
        headers = headers_dict(sent["headers"])
        source = (headers[HEADER_SOURCE_TOPIC], int(headers[HEADER_SOURCE_OFFSET]))
        entry = kinds_by_offset[source]
        seen.add(entry.kind)
        assert sent["topic"] == DEAD_LETTER_TOPIC
        assert headers[HEADER_SOURCE_PARTITION] == "0"
        assert headers[HEADER_REASON].startswith(entry.field.split(".")[0] + ":"), entry.kind
        assert f"field {entry.field!r}" in headers[HEADER_ERROR], entry.kind
        assert entry.rule in headers[HEADER_ERROR], entry.kind
        assert sent["key"] == entry.key
        assert sent["value"] == (entry.value or b""), entry.kind
    assert seen == {entry.kind for entry in corpus}
    sent_by_label = Counter(
        (headers_dict(s["headers"])[HEADER_SOURCE_TOPIC], headers_dict(s["headers"])[HEADER_REASON])
        for s in producer.sent
    )
    for (topic, reason), count in sent_by_label.items():
        labels = {"topic": topic, "reason": reason}
        assert registry.get_sample_value("octr_joiner_dead_letter_total", labels) == count
    assert dead_letter_total(registry) == len(corpus)


def dead_letter_total(registry: CollectorRegistry) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        if metric.name == "octr_joiner_dead_letter"
        for sample in metric.samples
        if sample.name == "octr_joiner_dead_letter_total"
    )


def test_oversized_record_copy_is_cut() -> None:
    joiner, producer, registry = build_joiner(time.time())
    value = b"x" * (MAX_DEAD_LETTER_BYTES * 2)
    key = b"k" * (MAX_DEAD_LETTER_BYTES * 2)

    joiner._buffer(TopicPartition(TOPICS["clicks"], 3), [Record(7, key, value)])

    (sent,) = producer.sent
    assert len(sent["key"]) + len(sent["value"]) <= MAX_DEAD_LETTER_BYTES
    assert sent["key"] == key[: len(sent["key"])]
    assert sent["value"] == value[: len(sent["value"])]
    error = headers_dict(sent["headers"])[HEADER_ERROR]
    assert f"of {len(value)} value bytes" in error
    assert dead_letter_total(registry) == 1


def test_time_limits_follow_settings() -> None:
    settings = JoinerSettings(
        topic_clicks=TOPICS["clicks"],
        min_event_time="1970-01-01T00:00:00Z",
        max_event_future_seconds=10,
    )
    producer = RecordingProducer()
    joiner = Joiner(
        settings,
        consumer=None,
        producer=producer,
        store=InMemoryJoinStore(),
        metrics=JoinerMetrics(CollectorRegistry()),
        clock=ManualClock(1000.0),
    )
    records = [
        Record(0, b"epoch", encode(Click(impression_id="epoch", event_time=0))),
        Record(1, b"soon", encode(Click(impression_id="soon", event_time=1010))),
        Record(2, b"late", encode(Click(impression_id="late", event_time=1011))),
    ]

    joiner._buffer(TopicPartition(TOPICS["clicks"], 0), records)

    buffered = [b.event.impression_id for b in joiner.buffers[0].sides[1]]
    assert buffered == ["epoch", "soon"]
    (sent,) = producer.sent
    assert headers_dict(sent["headers"])[HEADER_REASON] == "event_time:in_future"


# Integration: the real joiner process against the session's broker and Redis.


def metric_samples(port: int, name: str) -> dict[str, float] | None:
    """Return ``{label text: value}`` for one metric, or None while /metrics is not up."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
    except OSError:
        return None
    samples = {}
    for line in body.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) :].rsplit(" ", 1)
            samples[labels] = float(value)
    return samples


def produce_interleaved(bootstrap: str, env: dict[str, str], corpus: list[BadEvent], now: float):
    """Produce each corpus entry after a valid impression; click every even impression.

    Returns the corpus entries by (topic, partition, offset) and the expected examples.
    """
    topics = {
        "impressions": env["ONLINE_CTR_TOPIC_IMPRESSIONS"],
        "clicks": env["ONLINE_CTR_TOPIC_CLICKS"],
    }
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    pending = []
    expected = set()
    for number, entry in enumerate(corpus):
        impression_time = now - 3600 + 10 * number
        key, value = valid_impression(number, impression_time)
        producer.send(topics["impressions"], key=key, value=value)
        if number % 2 == 0:
            click = Click(impression_id=f"valid-{number}", event_time=impression_time + 5)
            producer.send(topics["clicks"], key=key, value=encode(click))
            expected.add((f"valid-{number}", 1, "click"))
        else:
            expected.add((f"valid-{number}", 0, "window_closed"))
        pending.append(
            (entry, producer.send(topics[entry.topic], key=entry.key, value=entry.value))
        )
    producer.flush()

    by_source = {}
    for entry, future in pending:
        metadata = future.get(timeout=30)
        by_source[(metadata.topic, metadata.partition, metadata.offset)] = entry
    producer.close()
    return by_source, expected


def read_dead_letters(consumer: KafkaConsumer, records: list) -> int:
    for batch in consumer.poll(timeout_ms=500).values():
        records.extend(batch)
    return len(records)


@pytest.mark.integration
def test_joiner_dead_letters_corpus_and_joins_valid(
    pipeline_env, start_service, kafka_broker
) -> None:
    corpus = build_corpus()
    by_source, expected = produce_interleaved(
        kafka_broker.bootstrap, pipeline_env, corpus, dt.datetime.now(dt.UTC).timestamp()
    )
    port = find_free_port()
    env = {
        **pipeline_env,
        "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "2",
        "ONLINE_CTR_METRICS_PORT": str(port),
    }

    joiner = start_service(["joiner"], env, name="joiner")
    examples = ExampleReader(kafka_broker.bootstrap, env["ONLINE_CTR_TOPIC_EXAMPLES"])
    dead_letters = KafkaConsumer(
        env["ONLINE_CTR_TOPIC_DEAD_LETTER"],
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    records: list = []
    wait_until(
        lambda: (
            (
                examples.poll() >= len(expected)
                and read_dead_letters(dead_letters, records) >= len(corpus)
            )
            or not joiner.is_running()
        ),
        timeout=120,
        message="the examples and dead letters did not all arrive",
        services=(joiner,),
    )
    time.sleep(1)
    read_dead_letters(dead_letters, records)
    examples.poll()
    dead_letters.close()

    assert joiner.is_running(), joiner.log()
    assert set(examples.examples) == expected
    assert len(records) == len(corpus)
    kinds = Counter()
    reasons = Counter()
    for record in records:
        headers = headers_dict(record.headers)
        source = (
            headers[HEADER_SOURCE_TOPIC],
            int(headers[HEADER_SOURCE_PARTITION]),
            int(headers[HEADER_SOURCE_OFFSET]),
        )
        entry = by_source[source]
        kinds[entry.kind] += 1
        reasons[headers[HEADER_REASON]] += 1
        assert f"field {entry.field!r}" in headers[HEADER_ERROR], entry.kind
        assert entry.rule in headers[HEADER_ERROR], entry.kind
        assert record.key == entry.key, entry.kind
        assert record.value == (entry.value or b""), entry.kind
    assert kinds == Counter({entry.kind: 1 for entry in corpus})

    samples = metric_samples(port, "octr_joiner_dead_letter_total")
    assert samples is not None
    assert sum(samples.values()) == len(corpus)
    by_reason = Counter()
    for labels, value in samples.items():
        reason = labels.split('reason="', 1)[1].split('"', 1)[0]
        by_reason[reason] += int(value)
    assert by_reason == reasons
    assert joiner.stop() == 0, joiner.log()
