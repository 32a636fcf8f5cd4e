"""Running click-rate features never use a label before it is revealed."""

from __future__ import annotations

import math

import pytest
from river import compose, preprocessing

from shared.learn.features import MAX_LOG_ODDS, RunningClickRates, ScaleNumeric
from shared.learn.models import build_model
from shared.learn.sampling import FakeNegativeCalibrated


def test_features_before_any_label_are_neutral() -> None:
    rates = RunningClickRates(prior_strength=10)

    features = rates.transform_one({"item_id": "a", "price": 3.0})

    assert features["rate:item_id"] == 0.0
    assert features["rate:__overall__"] == pytest.approx(math.log(0.01 / 0.99))
    assert "rate:price" not in features
    assert features["price"] == 3.0


def test_transform_ignores_label_of_same_example_in_pipeline() -> None:
    # The pipeline transforms with the counts from before the example's own
    # label, so the first click on a new value is invisible to its own features.
    seen = []

    class Recorder(RunningClickRates):
        def transform_one(self, x):
            features = super().transform_one(x)
            seen.append(features["rate:item_id"])
            return features

    pipeline = compose.Pipeline(Recorder(prior_strength=10), build_model("logreg"))
    pipeline.learn_one({"item_id": "a"}, True)
    pipeline.learn_one({"item_id": "a"}, True)

    assert seen[0] == 0.0
    assert seen[1] > 0.0


def test_rates_change_only_when_labels_are_learned() -> None:
    rates = RunningClickRates(prior_strength=10)
    x = {"item_id": "a", "category": "c"}
    before = rates.transform_one(x)

    for _ in range(100):
        rates.transform_one(x)

    assert rates.transform_one(x) == before
    rates.learn_one(x, True)
    assert rates.transform_one(x)["rate:item_id"] > before["rate:item_id"]


def test_rate_is_smoothed_lift_over_overall() -> None:
    rates = RunningClickRates(prior_strength=20)
    for index in range(200):
        rates.learn_one({"item_id": "hot" if index < 100 else "cold"}, index < 20)

    overall = rates.overall_rate()
    hot = rates.transform_one({"item_id": "hot"})["rate:item_id"]
    expected_rate = (20 + overall * 20) / (100 + 20)

    assert overall == pytest.approx((20 + 0.2) / (200 + 20))
    assert hot == pytest.approx(
        math.log(expected_rate / (1 - expected_rate)) - math.log(overall / (1 - overall))
    )
    assert rates.transform_one({"item_id": "cold"})["rate:item_id"] < 0


def test_lift_is_clipped() -> None:
    rates = RunningClickRates(prior_strength=0.001)
    for _ in range(50):
        rates.learn_one({"item_id": "always"}, True)
    for _ in range(5000):
        rates.learn_one({"item_id": "never"}, False)

    assert rates.transform_one({"item_id": "always"})["rate:item_id"] == MAX_LOG_ODDS
    assert rates.transform_one({"item_id": "never"})["rate:item_id"] == -MAX_LOG_ODDS


def test_scale_numeric_leaves_strings_and_bools() -> None:
    scaler = ScaleNumeric()
    for value in (1.0, 2.0, 3.0):
        scaler.learn_one({"price": value, "flag": True, "name": "x"})

    scaled = scaler.transform_one({"price": 3.0, "flag": True, "name": "x"})

    assert scaled["price"] == pytest.approx(1.0 / math.sqrt(2.0 / 3.0))
    assert scaled["flag"] is True
    assert scaled["name"] == "x"


def test_fake_negative_calibration_inverts_the_bias() -> None:
    class Constant:
        def predict_proba_one(self, x):
            return {True: 0.2, False: 0.8}

    calibrated = FakeNegativeCalibrated(Constant())

    # b = p / (1 + p) = 0.2 gives p = 0.25.
    assert calibrated.predict_proba_one({})[True] == pytest.approx(0.25)


def test_replay_serves_no_unrevealed_label() -> None:
    from pathlib import Path

    from shared.events import Click, Impression
    from shared.learn.models import ScoringLogisticRegression
    from shared.replay.runner import Replay, ReplayConfig
    from shared.snapshots import ModelBundle

    served_rates: dict[str, float] = {}

    class Recorder(RunningClickRates):
        def transform_one(self, x):
            features = super().transform_one(x)
            served_rates.setdefault(x["name"], features["rate:item_id"])
            return features

    model = compose.Pipeline(
        Recorder(prior_strength=1, features=["item_id"]),
        preprocessing.FeatureHasher(n_features=1024, seed=1),
        ScoringLogisticRegression(),
    )
    events = [
        Impression(impression_id="i1", event_time=0, item_id="a", features={"name": "i1"}),
        Impression(impression_id="i2", event_time=50, item_id="a", features={"name": "i2"}),
        Click(impression_id="i1", event_time=100),
        Impression(impression_id="i3", event_time=150, item_id="a", features={"name": "i3"}),
    ]
    config = ReplayConfig(events=Path("unused"), delayed_feedback="none")
    bundle = ModelBundle(model=model, baseline=build_model("prior"), model_name="test")

    Replay(config, initial_bundle=bundle).replay(events)

    # i2 is served after i1 but before i1's click is revealed at t = 100.
    assert served_rates["i2"] == 0.0
    assert served_rates["i3"] > 0.0
