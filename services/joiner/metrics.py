"""Prometheus metrics of the joiner, in base units."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Buckets in seconds, from one millisecond to half a minute.
BATCH_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Label delays in seconds, from one second to a day.
LABEL_DELAY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)


class JoinerMetrics:
    """Every metric the joiner exports, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events_consumed = Counter(
            "octr_joiner_events_consumed_total",
            "Records consumed, valid or not, by topic.",
            ["topic"],
            registry=registry,
        )
        self.examples_emitted = Counter(
            "octr_joiner_examples_emitted_total",
            "Labelled examples produced, by label and how the label was decided.",
            ["label", "reason"],
            registry=registry,
        )
        self.join_outcomes = Counter(
            "octr_joiner_join_outcomes_total",
            "Join outcomes: duplicates, late and orphan clicks, windows closed, and so on.",
            ["outcome"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "octr_joiner_dead_letter_total",
            "Invalid records sent to the dead-letter topic, by source topic and reason.",
            ["topic", "reason"],
            registry=registry,
        )
        self.pending_impressions = Gauge(
            "octr_joiner_pending_impressions",
            "Impressions whose attribution window is open, by partition.",
            ["partition"],
            registry=registry,
        )
        self.watermark_lag = Gauge(
            "octr_joiner_watermark_lag_seconds",
            "Wall-clock time minus the partition's watermark; grows while a partition is quiet.",
            ["partition"],
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "octr_joiner_consumer_lag_records",
            "High watermark minus consumer position, by topic and partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.batch_duration = Histogram(
            "octr_joiner_batch_duration_seconds",
            "Time to join, produce and commit one poll's records.",
            buckets=BATCH_SECONDS_BUCKETS,
            registry=registry,
        )
        self.label_delay = Histogram(
            "octr_joiner_label_delay_seconds",
            "Event-time delay between an impression and its decided label.",
            ["label"],
            buckets=LABEL_DELAY_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "octr_joiner_retries_total",
            "Retries after a dependency failed, by dependency.",
            ["dependency"],
            registry=registry,
        )
