"""The served-impression log: bounded, never blocking scoring, and exact on the wire."""

from __future__ import annotations

import dataclasses
import logging
import time

import pytest
from kafka import KafkaConsumer
from kafka.errors import KafkaTimeoutError
from prometheus_client import CollectorRegistry

from services.scorer.app import create_app
from services.scorer.logging_sink import KafkaImpressionSink, ServedImpression
from services.scorer.metrics import ScorerMetrics
from shared.events import encode, parse_impression
from shared.kafka import make_producer
from shared.localstack import create_topics, find_free_port
from tests.services.conftest import wait_until
from tests.services.scorer.conftest import holder_with, loaded, scorer_settings, trained_bundle


def record(index: int, user_id: str | None = "user-1") -> ServedImpression:
    return ServedImpression(
        impression_id=f"imp-{index}",
        event_time=1_733_313_600.0 + index,
        user_id=user_id,
        item_id=f"item-{index % 3}",
        features={"position": index, "campaign": "c1", "flag": True, "price": 1.5},
        model_version="champion:3",
        arm="champion",
        probability=0.25,
        baseline_probability=0.01,
    )


def unavailable_producer():
    raise KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:9']")


def dropped(registry: CollectorRegistry, reason: str) -> float:
    labels = {"reason": reason}
    return registry.get_sample_value("octr_scorer_impression_log_dropped_total", labels) or 0.0


def test_full_queue_drops_and_counts(caplog):
    registry = CollectorRegistry()
    sink = KafkaImpressionSink(unavailable_producer, "impressions", 5, ScorerMetrics(registry))
    caplog.set_level(logging.WARNING, logger="services.scorer.logging_sink")

    accepted = [sink.offer(record(index)) for index in range(20)]

    assert accepted == [True] * 5 + [False] * 15
    assert dropped(registry, "queue_full") == 15
    drop_lines = [r for r in caplog.records if r.getMessage().startswith("Dropped")]
    assert len(drop_lines) == 1


def test_close_counts_unsent_records():
    registry = CollectorRegistry()
    sink = KafkaImpressionSink(unavailable_producer, "impressions", 10, ScorerMetrics(registry))
    sink.start()
    for index in range(4):
        sink.offer(record(index))

    sink.close(timeout_s=0.5)

    assert dropped(registry, "producer_unavailable") == 4


def test_scoring_goes_on_while_kafka_is_down(serve):
    registry = CollectorRegistry()
    settings = scorer_settings(
        log_impressions=True,
        kafka_bootstrap_servers=f"127.0.0.1:{find_free_port()}",
        log_queue_size=5,
    )
    app = create_app(
        settings, holder=holder_with(loaded(trained_bundle())), metrics_registry=registry
    )
    client = serve(app)

    started = time.monotonic()
    statuses = [client.post("/v1/score", json={"item_id": "a"}).status_code for _ in range(20)]
    elapsed = time.monotonic() - started

    assert statuses == [200] * 20
    assert dropped(registry, "queue_full") == 15
    # Twenty requests on loopback; blocking on Kafka would take seconds.
    assert elapsed < 2.0


@pytest.mark.integration
def test_records_reach_kafka_exactly(kafka_broker, unique_name):
    topic = f"{unique_name}-impressions"
    create_topics(kafka_broker.bootstrap, {topic: 2})
    registry = CollectorRegistry()
    settings = scorer_settings(kafka_bootstrap_servers=kafka_broker.bootstrap)
    sink = KafkaImpressionSink(lambda: make_producer(settings), topic, 100, ScorerMetrics(registry))
    sink.start()
    sent = [record(index, user_id=None if index % 2 else "user-1") for index in range(30)]
    for item in sent:
        assert sink.offer(item)

    sink.close(timeout_s=10.0)

    assert registry.get_sample_value("octr_scorer_impression_log_sent_total") == 30
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        fetch_max_wait_ms=50,
    )
    received = []

    def read() -> bool:
        for batch in consumer.poll(timeout_ms=200).values():
            received.extend(batch)
        return len(received) >= len(sent)

    try:
        wait_until(read, timeout=20, message="the served impressions did not reach Kafka")
    finally:
        consumer.close()

    by_key = {message.key.decode(): message for message in received}
    assert len(received) == len(sent)
    for item in sent:
        message = by_key[item.impression_id]
        impression = parse_impression(message.value)
        assert message.timestamp == int(item.event_time * 1000)
        assert impression.event_time.timestamp() == item.event_time
        assert impression.user_id == item.user_id
        assert impression.item_id == item.item_id
        assert impression.features == item.features
        assert impression.served is not None
        assert impression.served.model_dump() == {
            "model_version": "champion:3",
            "arm": "champion",
            "probability": 0.25,
            "baseline_probability": 0.01,
            "shadow_probability": None,
        }


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"user_id": None},
        {"baseline_probability": None, "shadow_probability": 0.75},
        {"event_time": 1_733_313_600.123456, "arm": "challenger", "model_version": "ch:2"},
        {"features": {}, "item_id": "ünïcode ☃", "probability": 1.0},
        {"features": {"big": 2**63 - 1, "small": -(2**63), "tiny": 5e-324, "text": 'a"b\\c'}},
    ],
)
def test_fast_encoding_equals_event_encoding(changes):
    item = dataclasses.replace(record(1), **changes)

    assert item.to_json() == encode(item.to_impression())
