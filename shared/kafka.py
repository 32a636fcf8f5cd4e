"""Kafka clients, topics and the dead-letter sink, shared by the services.

Only features that both Apache Kafka and the Tansu test broker implement
correctly are used: explicit topic creation, consumer groups with explicit
commits, ``earliest`` offset reset, and ``consumer.highwater`` for lag. Latest
offset queries, ``offsets_for_times``, transactions and static membership are
avoided on purpose.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from shared.errors import ConfigError, UnavailableError
from shared.settings import ServiceSettings

logger = logging.getLogger(__name__)

HEADER_REASON = "octr-reason"
HEADER_ERROR = "octr-error"
HEADER_SOURCE_TOPIC = "octr-source-topic"
HEADER_SOURCE_PARTITION = "octr-source-partition"
HEADER_SOURCE_OFFSET = "octr-source-offset"


class MaskedSecret(str):
    """A secret string that kafka-python can use but that prints as ``***``.

    kafka-python logs its whole configuration at DEBUG, so a plain string
    would put the password in a log line.
    """

    def __repr__(self) -> str:
        return "'***'"


def client_config(settings: ServiceSettings) -> dict[str, Any]:
    """Return the connection and security options every kafka-python client takes."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers.split(","),
        "security_protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        assert settings.kafka_sasl_password is not None
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        config["sasl_plain_password"] = MaskedSecret(
            settings.kafka_sasl_password.get_secret_value()
        )
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL") and settings.kafka_ssl_cafile:
        config["ssl_cafile"] = settings.kafka_ssl_cafile
    return config


def make_producer(settings: ServiceSettings, **overrides: Any) -> KafkaProducer:
    """Build a producer that waits for all in-sync replicas and retries without reordering."""
    options: dict[str, Any] = {
        **client_config(settings),
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "compression_type": "lz4",
        "max_in_flight_requests_per_connection": 1,
        "retries": 5,
        "request_timeout_ms": 30_000,
    }
    options.update(overrides)
    return KafkaProducer(**options)


def make_consumer(settings: ServiceSettings, group_id: str, **overrides: Any) -> KafkaConsumer:
    """Build a consumer with explicit commits that starts new groups at the earliest offset."""
    options: dict[str, Any] = {
        **client_config(settings),
        "group_id": group_id,
        "enable_auto_commit": False,
        # "latest" would skip events a new group has never processed; it is
        # also unreliable on some Kafka-compatible brokers.
        "auto_offset_reset": "earliest",
    }
    options.update(overrides)
    return KafkaConsumer(**options)


def make_admin(settings: ServiceSettings) -> KafkaAdminClient:
    """Build an admin client."""
    return KafkaAdminClient(**client_config(settings), request_timeout_ms=15_000)


@dataclass(frozen=True)
class TopicSpec:
    """A topic and the partition count it must have."""

    name: str
    partitions: int
    replication_factor: int = 1


def pipeline_topics(
    settings: ServiceSettings, partitions: int = 4, replication_factor: int = 1
) -> list[TopicSpec]:
    """Return every topic the pipeline uses; impressions and clicks share a partition count."""
    return [
        TopicSpec(settings.topic_impressions, partitions, replication_factor),
        TopicSpec(settings.topic_clicks, partitions, replication_factor),
        TopicSpec(settings.topic_examples, partitions, replication_factor),
        TopicSpec(settings.topic_dead_letter, 1, replication_factor),
    ]


def create_topics(admin: KafkaAdminClient, topics: Iterable[TopicSpec]) -> list[str]:
    """Create topics that do not exist yet; return the names created.

    Existing topics are left as they are; ``check_copartitioned`` catches a
    partition count that differs from the one requested.
    """
    existing = set(admin.list_topics())
    missing = [topic for topic in topics if topic.name not in existing]
    if not missing:
        return []
    try:
        admin.create_topics(
            [NewTopic(t.name, t.partitions, t.replication_factor) for t in missing],
            timeout_ms=15_000,
        )
    except TopicAlreadyExistsError:
        logger.info("Another client created some of the topics first")
    return [topic.name for topic in missing]


def partition_count(consumer: KafkaConsumer, topic: str) -> int | None:
    """Return the topic's partition count from cluster metadata, or None if it does not exist."""
    partitions = consumer.partitions_for_topic(topic)
    return len(partitions) if partitions else None


def check_copartitioned(consumer: KafkaConsumer, first: str, second: str) -> int:
    """Check that two topics exist with the same partition count, and return it.

    The joiner needs both sides of a key on the same partition number, so that
    one consumer owns both; differing counts would route them apart.
    """
    counts = {topic: partition_count(consumer, topic) for topic in (first, second)}
    for topic, count in counts.items():
        if count is None:
            raise ConfigError(
                f"topic {topic!r} does not exist; create the topics with `online-ctr topics create`"
            )
    if counts[first] != counts[second]:
        raise ConfigError(
            f"topics {first!r} ({counts[first]} partitions) and {second!r} "
            f"({counts[second]} partitions) are not co-partitioned; both need the same "
            "partition count and the same key, or clicks reach a joiner that never saw "
            "their impression. Recreate one of them with the other's count."
        )
    assert counts[first] is not None
    return counts[first]


def wait_for_kafka(
    settings: ServiceSettings,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
) -> None:
    """Block until a broker responds to a metadata request, retrying with logged back-off."""
    deadline = monotonic() + settings.startup_timeout_seconds
    delay = 0.5
    attempt = 1
    while True:
        try:
            admin = make_admin(settings)
            admin.list_topics()
            admin.close()
            return
        except KafkaError as error:
            if monotonic() + delay > deadline:
                raise UnavailableError(
                    f"Kafka at {settings.kafka_bootstrap_servers} did not respond within "
                    f"{settings.startup_timeout_seconds:.0f} s ({error}); check "
                    "ONLINE_CTR_KAFKA_BOOTSTRAP_SERVERS and that the broker is up"
                ) from None
            logger.warning(
                "Kafka at %s not reachable (attempt %d, %s); retrying in %.1f s",
                settings.kafka_bootstrap_servers,
                attempt,
                error,
                delay,
            )
            sleep(delay)
            delay = min(delay * 2, 10.0)
            attempt += 1


class DeadLetterSink:
    """Send invalid records to the dead-letter topic with why and where they came from."""

    def __init__(self, producer: KafkaProducer, topic: str) -> None:
        self.producer = producer
        self.topic = topic

    def send(
        self,
        value: bytes | None,
        reason: str,
        error: str,
        source_topic: str,
        source_partition: int,
        source_offset: int,
        key: bytes | None = None,
    ):
        """Produce one dead-letter record; return the send future."""
        headers = [
            (HEADER_REASON, reason.encode()),
            (HEADER_ERROR, error.encode()[:1024].decode(errors="ignore").encode()),
            (HEADER_SOURCE_TOPIC, source_topic.encode()),
            (HEADER_SOURCE_PARTITION, str(source_partition).encode()),
            (HEADER_SOURCE_OFFSET, str(source_offset).encode()),
        ]
        return self.producer.send(self.topic, value=value or b"", key=key, headers=headers)


def headers_dict(headers: Iterable[tuple[str, bytes]] | None) -> Mapping[str, str]:
    """Decode record headers into a dict of strings."""
    return {name: value.decode(errors="replace") for name, value in headers or ()}
