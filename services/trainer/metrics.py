"""Prometheus metrics of the trainer, in base units."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

# Gauges set from the progressive evaluation, by arm (model or baseline).
EVALUATION_GAUGES = {
    "log_loss": "Log loss in nats of served scores",
    "normalized_entropy": "Log loss divided by the entropy of the click rate",
    "auc": "Exact ROC AUC of served scores",
    "calibration": "Sum of predictions over sum of clicks; 1 is calibrated",
}


class TrainerMetrics:
    """Every metric the trainer exports, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.examples_consumed = Counter(
            "octr_trainer_examples_consumed_total",
            "Example records read from Kafka, valid or not.",
            registry=registry,
        )
        self.examples_learned = Counter(
            "octr_trainer_examples_learned_total",
            "Examples the model learned from, by label.",
            ["label"],
            registry=registry,
        )
        self.duplicates_dropped = Counter(
            "octr_trainer_duplicates_dropped_total",
            "Examples dropped because an earlier copy was already learned.",
            registry=registry,
        )
        self.served_notices = Counter(
            "octr_trainer_served_notices_total",
            "Served notices read: learned as fake negatives, or ignored without "
            "fake-negative calibration.",
            ["action"],
            registry=registry,
        )
        self.negatives_sampled_out = Counter(
            "octr_trainer_negatives_sampled_out_total",
            "Negative examples not learned because of negative downsampling.",
            registry=registry,
        )
        self.invalid_examples = Counter(
            "octr_trainer_invalid_examples_total",
            "Example records that failed validation and were skipped.",
            ["reason"],
            registry=registry,
        )
        self.model_version = Gauge(
            "octr_trainer_model_version",
            "Version of the newest published snapshot.",
            registry=registry,
        )
        self.last_snapshot = Gauge(
            "octr_trainer_last_snapshot_timestamp_seconds",
            "Unix time of the newest published snapshot; age = time() - this.",
            registry=registry,
        )
        self.snapshot_failures = Counter(
            "octr_trainer_snapshot_failures_total",
            "Snapshot publications that failed.",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "octr_trainer_consumer_lag_records",
            "High watermark minus consumer position, by partition.",
            ["partition"],
            registry=registry,
        )
        self.evaluation = {
            name: Gauge(
                f"octr_trainer_{name}",
                f"{description}, over the rolling window.",
                ["arm"],
                registry=registry,
            )
            for name, description in EVALUATION_GAUGES.items()
        }
        self.evaluation_overall = {
            name: Gauge(
                f"octr_trainer_{name}_overall",
                f"{description}, since the trainer started.",
                ["arm"],
                registry=registry,
            )
            for name, description in EVALUATION_GAUGES.items()
            if name != "auc"
        }
        self.segment_normalized_entropy = Gauge(
            "octr_trainer_segment_normalized_entropy",
            "Normalised entropy of served scores per segment, since the trainer started.",
            ["feature", "value", "arm"],
            registry=registry,
        )
        self.segment_examples = Gauge(
            "octr_trainer_segment_examples",
            "Examples evaluated per segment, since the trainer started.",
            ["feature", "value"],
            registry=registry,
        )
