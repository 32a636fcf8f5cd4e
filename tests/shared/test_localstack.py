"""Integration tests of the local Redis, Tansu and Prometheus servers and their fixtures."""

from __future__ import annotations

import socket
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from shared.errors import UnavailableError
from shared.localstack import (
    LOOPBACK_HOST,
    TEST_CONSUMER_SETTINGS,
    PrometheusServer,
    RedisServer,
    TansuBroker,
    create_topics,
    find_free_port,
)

pytestmark = pytest.mark.integration

# redis-server syncs the append-only file once a second with appendfsync
# everysec, so a write is on disk at most about 1 s after it is acknowledged.
AOF_SYNC_WAIT_S = 1.5
CONSUME_TIMEOUT_S = 30.0
SCRAPE_TIMEOUT_S = 15.0


def test_redis_set_and_get(redis_client: redis.Redis, unique_name: str) -> None:
    key = f"{unique_name}:greeting"

    redis_client.set(key, b"hello")

    assert redis_client.get(key) == b"hello"


def test_redis_server_avoids_default_port(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    assert redis_server.url == f"redis://{LOOPBACK_HOST}:{redis_server.port}"


def test_redis_data_survives_sigkill(redis_server_bin: str, unique_name: str) -> None:
    server = RedisServer(redis_server_bin)
    server.start()
    try:
        client = redis.Redis.from_url(server.url)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        client.set(f"{unique_name}:kept", b"before-kill")
        client.close()
        time.sleep(AOF_SYNC_WAIT_S)

        first_pid = server.pid
        server.kill()
        assert not server.is_running
        server.start()

        assert server.pid != first_pid
        client = redis.Redis.from_url(server.url)
        assert client.get(f"{unique_name}:kept") == b"before-kill"
        client.close()
    finally:
        server.close()

    assert not server.workdir.exists()


def test_redis_start_failure_includes_log(redis_server_bin: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as occupier:
        occupier.bind((LOOPBACK_HOST, 0))
        occupier.listen()
        server = RedisServer(redis_server_bin, port=occupier.getsockname()[1])
        try:
            with pytest.raises(UnavailableError) as error:
                server.start()
        finally:
            server.close()

    message = str(error.value)
    assert "redis failed to start" in message
    assert "Address already in use" in message


def test_broker_round_trip_with_group(kafka_broker: TansuBroker, unique_name: str) -> None:
    topic = f"{unique_name}-events"
    create_topics(kafka_broker.bootstrap, {topic: 3})

    sent_by_key: dict[bytes, list[bytes]] = defaultdict(list)
    sent_per_partition: dict[int, int] = defaultdict(int)
    producer = KafkaProducer(bootstrap_servers=kafka_broker.bootstrap, acks="all")
    for index in range(60):
        key = f"user-{index % 12}".encode()
        value = f"event-{index}".encode()
        metadata = producer.send(topic, key=key, value=value).get(timeout=10)
        sent_by_key[key].append(value)
        sent_per_partition[metadata.partition] += 1
    producer.close()
    assert set(sent_per_partition) == {0, 1, 2}

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_broker.bootstrap,
        group_id=f"{unique_name}-group",
        **TEST_CONSUMER_SETTINGS,
    )
    received_by_key: dict[bytes, list[bytes]] = defaultdict(list)
    received_count = 0
    deadline = time.monotonic() + CONSUME_TIMEOUT_S
    try:
        while received_count < 60 and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    received_by_key[record.key].append(record.value)
                    received_count += 1

        consumer.commit()
        partitions = [TopicPartition(topic, partition) for partition in range(3)]
        assert consumer.assignment() == set(partitions)
        assert received_count == 60
        assert received_by_key == sent_by_key
        for tp in partitions:
            assert consumer.highwater(tp) == sent_per_partition[tp.partition]
            assert consumer.committed(tp) == sent_per_partition[tp.partition]
    finally:
        consumer.close()


def test_broker_restart_keeps_port_loses_topics(tansu_bin: str, unique_name: str) -> None:
    broker = TansuBroker(tansu_bin)
    broker.start()
    try:
        bootstrap = broker.bootstrap
        create_topics(bootstrap, {f"{unique_name}-gone": 1})

        broker.kill()
        broker.start()

        assert broker.bootstrap == bootstrap
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            assert f"{unique_name}-gone" not in admin.list_topics()
        finally:
            admin.close()
    finally:
        broker.close()


def test_create_topics_rejects_zero_partitions(kafka_broker: TansuBroker) -> None:
    with pytest.raises(ValueError, match="invalid partition count 0"):
        create_topics(kafka_broker.bootstrap, {"never-created": 0})


def test_prometheus_scrapes_gauge_and_rule(
    prometheus_bin: str, tmp_path: Path, unique_name: str
) -> None:
    metric = unique_name.replace("-", "_") + "_value"
    registry = CollectorRegistry()
    Gauge(metric, "A value set by the test.", registry=registry).set(42.5)
    metrics_port = find_free_port()
    metrics_server, metrics_thread = start_http_server(
        metrics_port, addr=LOOPBACK_HOST, registry=registry
    )
    rule_file = tmp_path / "rules.yml"
    rule_file.write_text(
        "groups:\n"
        "  - name: test\n"
        "    rules:\n"
        f"      - record: {metric}:doubled\n"
        f"        expr: {metric} * 2\n",
        encoding="utf-8",
    )
    prometheus = PrometheusServer(
        [f"{LOOPBACK_HOST}:{metrics_port}"], rule_files=[rule_file], binary=prometheus_bin
    )
    prometheus.start()
    try:
        scraped = prometheus.wait_for(metric, timeout_s=SCRAPE_TIMEOUT_S)
        recorded = prometheus.wait_for(f"{metric}:doubled", timeout_s=SCRAPE_TIMEOUT_S)
    finally:
        prometheus.close()
        metrics_server.shutdown()
        metrics_server.server_close()
        metrics_thread.join(timeout=5)

    assert len(scraped) == 1
    assert scraped[0]["metric"]["instance"] == f"{LOOPBACK_HOST}:{metrics_port}"
    assert float(scraped[0]["value"][1]) == 42.5
    assert float(recorded[0]["value"][1]) == 85.0


def test_prometheus_query_rejects_bad_expr(prometheus_bin: str) -> None:
    prometheus = PrometheusServer(binary=prometheus_bin)
    prometheus.start()
    try:
        with pytest.raises(ValueError, match="parse error"):
            prometheus.query("rate(")
    finally:
        prometheus.close()


def test_prometheus_bad_rule_fails_start(prometheus_bin: str, tmp_path: Path) -> None:
    rule_file = tmp_path / "broken.yml"
    rule_file.write_text("groups: [{name: broken, rules: [{record: x, expr: 'rate('}]}]\n")
    prometheus = PrometheusServer(rule_files=[rule_file], binary=prometheus_bin)
    try:
        with pytest.raises(UnavailableError) as error:
            prometheus.start()
    finally:
        prometheus.close()

    assert "prometheus failed to start" in str(error.value)
    assert str(rule_file) in str(error.value)
