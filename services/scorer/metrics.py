"""Prometheus metrics of the scorer, in base units.

With several uvicorn workers, each worker is its own process, and
prometheus-client's multiprocess mode adds up their counters and histograms
(see ``exposition_registry``). In that mode, a gauge that describes one
worker's state, such as its model version or the drift over its requests, is
exported per live worker with a ``pid`` label. The thresholds are exported once.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

# Set by main.run before it starts the worker processes.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# Request latency in seconds, from a tenth of a millisecond to 2.5 s.
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)

# In multiprocess mode: one series per live worker, labelled with its pid.
_PER_WORKER = "liveall"


class ScorerMetrics:
    """Every metric the scorer exports, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._define_requests(registry)
        self._define_models(registry)
        self._define_impression_log(registry)
        self._define_drift(registry)

    def _define_requests(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "octr_scorer_requests_total",
            "Requests by endpoint, arm and HTTP status. Each impression of a batch counts once "
            "with the arm that scored it; requests that scored nothing have arm 'none'.",
            ["endpoint", "arm", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "octr_scorer_request_duration_seconds",
            "Time from receiving a request to sending its response, by endpoint.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.scoring_errors = Counter(
            "octr_scorer_scoring_errors_total",
            "Impressions that a model raised an error on, by arm.",
            ["arm"],
            registry=registry,
        )

    def _define_models(self, registry: CollectorRegistry) -> None:
        self.model_version = Gauge(
            "octr_scorer_model_version",
            "Snapshot version being served, by arm.",
            ["arm"],
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.model_age = Gauge(
            "octr_scorer_model_age_seconds",
            "Time since the served snapshot was created by the trainer, by arm.",
            ["arm"],
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.model_reloads = Counter(
            "octr_scorer_model_reloads_total",
            "Snapshots verified, loaded and swapped in, by arm.",
            ["arm"],
            registry=registry,
        )
        self.model_reload_failures = Counter(
            "octr_scorer_model_reload_failures_total",
            "Snapshots that could not be loaded, by arm and reason; the previous model stays.",
            ["arm", "reason"],
            registry=registry,
        )
        self.registry_last_success = Gauge(
            "octr_scorer_registry_last_success_timestamp_seconds",
            "Unix time at which the model registry in Redis last answered the reloader.",
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.ready = Gauge(
            "octr_scorer_ready",
            "1 while /readyz returns 200, else 0; refreshed every second.",
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.max_model_age = Gauge(
            "octr_scorer_max_model_age_seconds",
            "Configured champion snapshot age above which /readyz fails.",
            multiprocess_mode="max",
            registry=registry,
        )

    def _define_impression_log(self, registry: CollectorRegistry) -> None:
        self.impression_log_sent = Counter(
            "octr_scorer_impression_log_sent_total",
            "Served impressions that the broker acknowledged.",
            registry=registry,
        )
        self.impression_log_dropped = Counter(
            "octr_scorer_impression_log_dropped_total",
            "Served impressions not logged, by reason: queue_full, producer_unavailable, "
            "send_failed, delivery_failed or invalid.",
            ["reason"],
            registry=registry,
        )
        self.impression_log_queue = Gauge(
            "octr_scorer_impression_log_queue_records",
            "Served impressions waiting in the buffer for the Kafka producer.",
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )

    def _define_drift(self, registry: CollectorRegistry) -> None:
        self.feature_psi = Gauge(
            "octr_scorer_feature_psi",
            "Population stability index of a feature over the drift window against the "
            "champion snapshot's reference; NaN without data.",
            ["feature"],
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.score_psi = Gauge(
            "octr_scorer_score_psi",
            "Population stability index of the champion's predicted click probability over the "
            "drift window; NaN without data.",
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.feature_missing_ratio = Gauge(
            "octr_scorer_feature_missing_ratio",
            "Share of requests in the drift window without the feature.",
            ["feature"],
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.feature_reference_missing_ratio = Gauge(
            "octr_scorer_feature_reference_missing_ratio",
            "Share of the reference's training examples without the feature.",
            ["feature"],
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.feature_unseen_category_ratio = Gauge(
            "octr_scorer_feature_unseen_category_ratio",
            "Share of a categorical feature's values in the drift window that the reference "
            "does not list; NaN without data.",
            ["feature"],
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.predicted_ctr_mean = Gauge(
            "octr_scorer_predicted_ctr_mean",
            "Mean predicted click probability of the champion over the drift window.",
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.drift_window_requests = Gauge(
            "octr_scorer_drift_window_requests",
            "Requests in the drift window.",
            multiprocess_mode=_PER_WORKER,
            registry=registry,
        )
        self.prediction_drifts = Counter(
            "octr_scorer_prediction_drifts_total",
            "Changes in the champion's predicted click rate detected by ADWIN.",
            registry=registry,
        )
        self.psi_threshold = Gauge(
            "octr_scorer_psi_threshold",
            "Configured PSI above which a feature or the score counts as drifted.",
            multiprocess_mode="max",
            registry=registry,
        )
        self.missing_ratio_threshold = Gauge(
            "octr_scorer_missing_ratio_threshold",
            "Configured rise of a feature's missing share over the reference that counts as drift.",
            multiprocess_mode="max",
            registry=registry,
        )
        self.unseen_category_ratio_threshold = Gauge(
            "octr_scorer_unseen_category_ratio_threshold",
            "Configured share of unseen categories that counts as drift.",
            multiprocess_mode="max",
            registry=registry,
        )


def exposition_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """Return the registry to expose: the given one, or every worker's in multiprocess mode."""
    if not os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        return registry
    combined = CollectorRegistry()
    MultiProcessCollector(combined)
    return combined
