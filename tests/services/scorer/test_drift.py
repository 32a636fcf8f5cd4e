"""Drift metrics: PSI against the reference, missing and unseen shares, and the ADWIN detector."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry

from services.scorer.app import create_app
from services.scorer.drift import DriftMonitor, bin_counts_fast
from services.scorer.metrics import ScorerMetrics
from shared.drift import (
    CategoricalProfile,
    FeatureProfileBuilder,
    NumericProfile,
    ReferenceProfile,
    bin_counts,
)
from tests.services.scorer.conftest import (
    RecordingSink,
    holder_with,
    loaded,
    scorer_settings,
    stub_bundle,
)

# PSI floors empty shares at this value, as shared.drift.population_stability_index does.
EPSILON = 1e-4


def reference_profile() -> ReferenceProfile:
    return ReferenceProfile(
        examples=100,
        presence={"price": 1.0, "device": 0.9},
        features={
            "price": NumericProfile(edges=[10.0], shares=[0.5, 0.5], count=100),
            "device": CategoricalProfile(
                categories=["mobile", "desktop"], shares=[0.6, 0.4, 0.0], count=90
            ),
        },
        score=NumericProfile(edges=[0.5], shares=[0.5, 0.5], count=100),
    )


def shifted_window(monitor: DriftMonitor) -> None:
    """Add 100 requests: 90 with prices 80/20 around 10, 20% of an unseen device, scores 25/75."""
    devices = ["mobile"] * 50 + ["desktop"] * 30 + ["tablet"] * 20
    prices = [5.0] * 72 + [20.0] * 18 + [None] * 10
    scores = [0.3] * 25 + [0.7] * 75
    for device, price, score in zip(devices, prices, scores, strict=True):
        features = {"item_id": "item-1", "device": device}
        if price is not None:
            features["price"] = price
        monitor.observe(features, score)


def test_psi_matches_hand_computed_value():
    registry = CollectorRegistry()
    monitor = DriftMonitor(window_size=100, detector_delta=0.002, metrics=ScorerMetrics(registry))
    shifted_window(monitor)

    report = monitor.refresh(reference_profile())

    price_psi = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    device_psi = (
        (0.5 - 0.6) * math.log(0.5 / 0.6)
        + (0.3 - 0.4) * math.log(0.3 / 0.4)
        + (0.2 - EPSILON) * math.log(0.2 / EPSILON)
    )
    score_psi = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert report.feature_psi["price"] == pytest.approx(price_psi, rel=1e-12)
    assert report.feature_psi["price"] == pytest.approx(0.415888308, rel=1e-8)
    assert report.feature_psi["device"] == pytest.approx(device_psi, rel=1e-12)
    assert report.score_psi == pytest.approx(score_psi, rel=1e-12)
    assert report.missing_ratio == {"price": pytest.approx(0.1), "device": 0.0}
    assert report.reference_missing_ratio == {"price": 0.0, "device": pytest.approx(0.1)}
    assert report.unseen_category_ratio == {"device": pytest.approx(0.2)}
    assert report.mean_score == pytest.approx(0.6)
    assert report.window_requests == 100

    def gauge(name: str, labels: dict[str, str] | None = None) -> float | None:
        return registry.get_sample_value(name, labels or {})

    assert gauge("octr_scorer_feature_psi", {"feature": "price"}) == pytest.approx(price_psi)
    assert gauge("octr_scorer_score_psi") == pytest.approx(score_psi)
    assert gauge("octr_scorer_feature_missing_ratio", {"feature": "price"}) == pytest.approx(0.1)
    assert gauge("octr_scorer_feature_reference_missing_ratio", {"feature": "device"}) == (
        pytest.approx(0.1)
    )
    assert gauge("octr_scorer_feature_unseen_category_ratio", {"feature": "device"}) == (
        pytest.approx(0.2)
    )
    assert gauge("octr_scorer_predicted_ctr_mean") == pytest.approx(0.6)
    assert gauge("octr_scorer_drift_window_requests") == 100


def test_window_keeps_newest_requests():
    monitor = DriftMonitor(window_size=100, detector_delta=0.002)
    for _ in range(300):
        monitor.observe({"price": 50.0, "device": "mobile"}, 0.9)
    shifted_window(monitor)

    report = monitor.compute(reference_profile())

    assert report.window_requests == 100
    assert report.mean_score == pytest.approx(0.6)


def test_without_data_values_are_nan():
    registry = CollectorRegistry()
    monitor = DriftMonitor(window_size=100, detector_delta=0.002, metrics=ScorerMetrics(registry))

    report = monitor.refresh(reference_profile())

    assert report.feature_psi == {"price": None, "device": None}
    assert math.isnan(registry.get_sample_value("octr_scorer_score_psi"))
    assert math.isnan(registry.get_sample_value("octr_scorer_feature_psi", {"feature": "price"}))


def test_feature_dropped_from_reference_set_to_nan():
    registry = CollectorRegistry()
    monitor = DriftMonitor(window_size=100, detector_delta=0.002, metrics=ScorerMetrics(registry))
    shifted_window(monitor)
    monitor.refresh(reference_profile())
    smaller = reference_profile().model_copy(
        update={
            "presence": {"device": 0.9},
            "features": {"device": reference_profile().features["device"]},
        }
    )

    monitor.refresh(smaller)

    assert math.isnan(registry.get_sample_value("octr_scorer_feature_psi", {"feature": "price"}))
    assert registry.get_sample_value("octr_scorer_feature_psi", {"feature": "device"}) > 1.0


def test_fast_bin_counts_equal_shared_ones():
    rng = random.Random(7)
    builder = FeatureProfileBuilder(seed=3)
    for _ in range(2000):
        builder.update(
            {
                "number": rng.choice([1, 2.5, 7, rng.gauss(0.0, 3.0)]),
                "category": rng.choice("abcd"),
            },
            rng.random(),
        )
    reference = builder.build()
    numbers = [
        rng.choice([1, 2, 2.5, 7, 7.0, True, "x", float("nan"), rng.gauss(0.0, 3.0)])
        for _ in range(3000)
    ]
    categories = [rng.choice(["a", "b", "zz", True, 1, 1.0, False, None]) for _ in range(3000)]

    for name, values in (("number", numbers), ("category", categories)):
        profile = reference.features[name]
        assert bin_counts_fast(profile, values) == bin_counts(profile, values), name
    assert bin_counts_fast(reference.score, [0.0, 1e-5, 0.5, 1.0]) == bin_counts(
        reference.score, [0.0, 1e-5, 0.5, 1.0]
    )


def test_drift_detected_once_after_shift(serve):
    rng = random.Random(42)
    before = [min(1.0, max(0.0, rng.gauss(0.8, 0.05))) for _ in range(1000)]
    after = [min(1.0, max(0.0, rng.gauss(0.4, 0.02))) for _ in range(1000)]
    builder = FeatureProfileBuilder()
    for _ in range(1000):
        builder.update({"item_id": "item-1"}, min(1.0, max(0.0, rng.gauss(0.8, 0.05))))
    champion = loaded(stub_bundle(feature="p"), reference=builder.build())
    registry = CollectorRegistry()
    app = create_app(
        scorer_settings(drift_window_size=1000),
        holder=holder_with(champion),
        sink=RecordingSink(),
        metrics_registry=registry,
    )
    client = serve(app)

    def detections() -> float:
        return registry.get_sample_value("octr_scorer_prediction_drifts_total") or 0.0

    rises = []
    for index, probability in enumerate(before + after):
        counted = detections()
        response = client.post(
            "/v1/score", json={"item_id": "item-1", "features": {"p": probability}}
        )
        assert response.status_code == 200
        if detections() > counted:
            rises.append(index)

    assert len(rises) == 1, rises
    assert 1000 <= rises[0] < 1100
    for _ in range(5):
        client.get("/metrics")
        app.state.refresher.refresh_drift()
    assert detections() == 1.0
    assert registry.get_sample_value("octr_scorer_score_psi") > 0.25
    assert registry.get_sample_value("octr_scorer_predicted_ctr_mean") == pytest.approx(
        0.4, abs=0.01
    )
