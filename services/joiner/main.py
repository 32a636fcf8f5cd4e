"""Entry point of ``online-ctr joiner``: the same start-up steps as every service."""

from __future__ import annotations

import logging

from kafka.coordinator.assignors.range import RangePartitionAssignor
from prometheus_client import CollectorRegistry

from services.joiner.app import Joiner
from services.joiner.metrics import JoinerMetrics
from services.joiner.settings import JoinerSettings
from shared.join.redis_store import RedisJoinStore
from shared.kafka import check_copartitioned, make_consumer, make_producer, wait_for_kafka
from shared.service import install_stop_handlers, make_redis, start_metrics, wait_for_redis

logger = logging.getLogger(__name__)


def build_joiner(settings: JoinerSettings, registry: CollectorRegistry) -> Joiner:
    """Connect to Kafka and Redis, check the topics, and build the joiner."""
    wait_for_kafka(settings)
    client = make_redis(settings)
    wait_for_redis(client, settings)

    consumer = make_consumer(
        settings,
        settings.joiner_group_id,
        # Range assignment gives one member the same partition number of
        # both co-partitioned topics; round robin would split them.
        partition_assignment_strategy=[RangePartitionAssignor],
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_poll_records=settings.max_poll_records,
    )
    partitions = check_copartitioned(consumer, settings.topic_impressions, settings.topic_clicks)
    logger.info(
        "Topics %s and %s have %d partitions each",
        settings.topic_impressions,
        settings.topic_clicks,
        partitions,
    )

    return Joiner(
        settings,
        consumer,
        make_producer(settings),
        RedisJoinStore(client, settings.redis_namespace),
        JoinerMetrics(registry),
        producer_factory=lambda: make_producer(settings),
    )


def run(settings: JoinerSettings) -> int:
    """Run the joiner until SIGTERM or SIGINT, then commit and leave the group."""
    registry = CollectorRegistry()
    joiner = build_joiner(settings, registry)
    stop = install_stop_handlers()
    stop_metrics = start_metrics(registry, settings)

    joiner.subscribe()
    try:
        joiner.run(stop)
    finally:
        joiner.close()
        if stop_metrics is not None:
            stop_metrics()
    logger.info("Joiner stopped")
    return 0
