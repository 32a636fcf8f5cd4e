"""Entry point of ``online-ctr simulator``: the same start-up steps as every service."""

from __future__ import annotations

import logging
import uuid

from prometheus_client import CollectorRegistry

from services.simulator.app import HttpScorer, KafkaEventSink, Simulator
from services.simulator.metrics import SimulatorMetrics
from services.simulator.population import Population
from services.simulator.settings import SimulatorSettings
from shared.kafka import make_producer, wait_for_kafka
from shared.service import install_stop_handlers, start_metrics

logger = logging.getLogger(__name__)


def build_simulator(settings: SimulatorSettings, registry: CollectorRegistry) -> Simulator:
    """Connect to Kafka and build the simulator with a fresh population."""
    wait_for_kafka(settings)
    metrics = SimulatorMetrics(registry)
    # A new run id per start keeps impression ids unique across restarts,
    # because the join treats a repeated id as a duplicate.
    run_id = uuid.uuid4().hex[:8]
    logger.info("Simulator run %s, population seed %d", run_id, settings.simulator_seed)
    return Simulator(
        settings,
        Population(settings, run_id),
        HttpScorer(settings.scorer_url, settings.scorer_timeout_seconds),
        KafkaEventSink(
            make_producer(settings), settings.topic_clicks, settings.topic_impressions, metrics
        ),
        metrics,
    )


def run(settings: SimulatorSettings) -> int:
    """Run the simulator until SIGTERM, SIGINT or ``run_seconds``, then flush the clicks."""
    registry = CollectorRegistry()
    simulator = build_simulator(settings, registry)
    stop = install_stop_handlers()
    stop_metrics = start_metrics(registry, settings)

    try:
        simulator.run(stop)
    finally:
        simulator.scorer.close()
        simulator.events.close()
        if stop_metrics is not None:
            stop_metrics()
    logger.info("Simulator stopped")
    return 0
