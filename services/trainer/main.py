"""Entry point of ``online-ctr trainer``: the same start-up steps as every service."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry

from services.trainer.app import Trainer
from services.trainer.dedup import RedisDeduplicator
from services.trainer.metrics import TrainerMetrics
from services.trainer.settings import TrainerSettings
from shared.errors import ConfigError
from shared.kafka import make_consumer, partition_count, wait_for_kafka
from shared.registry import ModelRegistry
from shared.service import install_stop_handlers, make_redis, start_metrics, wait_for_redis
from shared.snapshots import SigningKeys

logger = logging.getLogger(__name__)


def signing_keys(settings: TrainerSettings) -> SigningKeys:
    """Return the signing keys, which the trainer cannot run without."""
    if settings.signing_keys is None or settings.signing_key_id is None:
        raise ConfigError(
            "ONLINE_CTR_SIGNING_KEYS and ONLINE_CTR_SIGNING_KEY_ID are required: the scorer "
            'loads only signed snapshots. Generate a key with `python -c "import secrets; '
            'print(secrets.token_hex(32))"` and set ONLINE_CTR_SIGNING_KEYS=k1:<key>, '
            "ONLINE_CTR_SIGNING_KEY_ID=k1"
        )
    return SigningKeys.parse(settings.signing_keys, settings.signing_key_id)


def build_trainer(settings: TrainerSettings, registry: CollectorRegistry) -> Trainer:
    """Connect to Kafka and Redis, restore the newest snapshot, and build the trainer."""
    keys = signing_keys(settings)
    wait_for_kafka(settings)
    client = make_redis(settings)
    wait_for_redis(client, settings)

    consumer = make_consumer(
        settings,
        settings.trainer_group_id,
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_interval_ms=settings.max_poll_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        max_poll_records=settings.max_poll_records,
    )
    if partition_count(consumer, settings.topic_examples) is None:
        raise ConfigError(
            f"topic {settings.topic_examples!r} does not exist; create the topics with "
            "`online-ctr topics create`"
        )

    trainer = Trainer(
        settings,
        consumer,
        ModelRegistry(
            client, keys, namespace=settings.registry_namespace, retain=settings.retain_snapshots
        ),
        RedisDeduplicator(client, settings.dedup_namespace, settings.dedup_horizon_seconds),
        TrainerMetrics(registry),
    )
    trainer.restore()
    return trainer


def run(settings: TrainerSettings) -> int:
    """Run the trainer until SIGTERM or SIGINT, then publish a last snapshot and leave the group."""
    registry = CollectorRegistry()
    trainer = build_trainer(settings, registry)
    stop = install_stop_handlers()
    stop_metrics = start_metrics(registry, settings)

    trainer.subscribe()
    try:
        trainer.run(stop)
    finally:
        trainer.close()
        if stop_metrics is not None:
            stop_metrics()
    logger.info("Trainer stopped")
    return 0
