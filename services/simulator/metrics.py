"""Prometheus metrics of the traffic simulator, in base units."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Round trips to the scorer, in seconds, from half a millisecond to five seconds.
REQUEST_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class SimulatorMetrics:
    """Every metric the simulator exports, registered on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.impressions = Counter(
            "octr_simulator_impressions_total",
            "Impressions sent to the scorer, by result: scored, rejected (an HTTP error "
            "status) or failed (no response).",
            ["result"],
            registry=registry,
        )
        self.unscored_impressions = Counter(
            "octr_simulator_unscored_impressions_total",
            "Impressions produced to the impressions topic without a served score, because the "
            "scorer was unavailable.",
            registry=registry,
        )
        self.unscored_impressions_failed = Counter(
            "octr_simulator_unscored_impressions_failed_total",
            "Unscored impressions that could not be produced to the impressions topic.",
            registry=registry,
        )

        self.shown_impressions = Counter(
            "octr_simulator_shown_impressions_total",
            "Impressions shown to simulated users: scored ones and those produced unscored.",
            registry=registry,
        )
        self.expected_clicks = Counter(
            "octr_simulator_expected_clicks_total",
            "Sum of the true click probabilities of shown impressions, scored or not; divided "
            "by the shown impressions it is the true click rate.",
            registry=registry,
        )

        self.clicks = Counter(
            "octr_simulator_clicks_total",
            "Clicks by result: sent to the clicks topic, failed to send, or dropped because "
            "too many were pending.",
            ["result"],
            registry=registry,
        )
        self.pending_clicks = Gauge(
            "octr_simulator_pending_clicks",
            "Clicks drawn and waiting for their time.",
            registry=registry,
        )

        self.drift_active = Gauge(
            "octr_simulator_drift_active",
            "1 once the population has switched to its drifted behaviour, else 0.",
            registry=registry,
        )
        self.schedule_lag = Gauge(
            "octr_simulator_schedule_lag_seconds",
            "How late the newest impression was sent against its Poisson arrival time.",
            registry=registry,
        )

        self.request_duration = Histogram(
            "octr_simulator_score_request_duration_seconds",
            "Round-trip time of POST /v1/score as the simulator sees it.",
            buckets=REQUEST_SECONDS_BUCKETS,
            registry=registry,
        )

        for result in ("scored", "rejected", "failed"):
            self.impressions.labels(result=result)
        for result in ("sent", "failed", "dropped"):
            self.clicks.labels(result=result)
