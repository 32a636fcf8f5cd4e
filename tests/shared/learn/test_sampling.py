"""Negative downsampling: which negatives are kept, their weights, and calibration after correction.

Statistical checks allow four standard errors and use fixed seeds.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np
import pytest
from river import base

from shared.events import Impression, LabeledExample, LabelSource
from shared.learn.models import build_model
from shared.learn.sampling import NegativeSampler, RecalibratedClassifier, keep_fraction
from shared.streams.generate import GeneratorSettings, generate

RATE = 0.1
START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
CORRECTIONS = ("weight", "recalibrate")
# Registry models that learn with example weights.
WEIGHTED_MODELS = ("ctr", "logreg")

# The calibration stream: 60,000 impressions at the generator's default 5 %
# base click rate, of which the last 30,000 are evaluated.
CALIBRATION_IMPRESSIONS = 60_000
EVALUATED_IMPRESSIONS = 30_000


def make_example(impression_id: str, label: int) -> LabeledExample:
    impression = Impression(impression_id=impression_id, event_time=START, item_id="item-1")
    return LabeledExample(
        impression=impression,
        label=label,
        label_delay_seconds=0.0,
        label_source=LabelSource.CLICK if label else LabelSource.WINDOW_CLOSED,
        decided_at=START,
    )


class FixedProbabilityClassifier(base.Classifier):
    """A stub model that always predicts ``probability`` and records what it learns."""

    def __init__(self, probability: float) -> None:
        self.probability = probability
        self.learned: list[tuple[dict, bool, dict]] = []

    @property
    def _multiclass(self) -> bool:
        return False

    def learn_one(self, x, y, **params) -> None:
        self.learned.append((x, y, params))

    def predict_proba_one(self, x) -> dict[bool, float]:
        return {False: 1.0 - self.probability, True: self.probability}


# The keep decision.


def test_keep_fraction_is_pinned() -> None:
    # Replicas and restarts keep the same negatives only while the hash stays
    # the same: BLAKE2b with an 8-byte digest, read big-endian, over 2**64.
    assert keep_fraction("imp-0") == 0.525203915324484
    assert keep_fraction("gen-0-0") == 0.18015073590831882


def test_keep_decision_is_deterministic() -> None:
    examples = [make_example(f"imp-{index}", 0) for index in range(2_000)]
    first = NegativeSampler(RATE, "recalibrate")
    second = NegativeSampler(RATE, "weight")

    kept_first = [first.weight(example) > 0 for example in examples]
    kept_again = [first.weight(example) > 0 for example in examples]
    kept_second = [second.weight(example) > 0 for example in examples]

    assert kept_again == kept_first
    assert kept_second == kept_first


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_kept_share_of_negatives_matches_rate(rate: float) -> None:
    count = 20_000
    sampler = NegativeSampler(rate, "recalibrate")

    kept = sum(sampler.weight(make_example(f"imp-{index}", 0)) > 0 for index in range(count))

    tolerance = 4 * math.sqrt(rate * (1 - rate) / count)
    assert abs(kept / count - rate) <= tolerance


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_positives_always_kept(correction: str) -> None:
    sampler = NegativeSampler(RATE, correction)
    # Ids whose negative would be dropped, so keeping them is due to the label.
    dropped_ids = [f"imp-{index}" for index in range(500) if keep_fraction(f"imp-{index}") >= RATE]

    weights = [sampler.weight(make_example(impression_id, 1)) for impression_id in dropped_ids]

    assert len(dropped_ids) > 400
    assert weights == [1.0] * len(dropped_ids)


def test_weight_mode_weights_negatives_by_inverse_rate() -> None:
    sampler = NegativeSampler(RATE, "weight")
    ids = [f"imp-{index}" for index in range(1_000)]

    weights = {id_: sampler.weight(make_example(id_, 0)) for id_ in ids}

    for impression_id, weight in weights.items():
        expected = 1 / RATE if keep_fraction(impression_id) < RATE else 0.0
        assert weight == expected, impression_id
    assert any(weight > 0 for weight in weights.values())


def test_recalibrate_mode_learns_negatives_with_weight_one() -> None:
    sampler = NegativeSampler(RATE, "recalibrate")
    ids = [f"imp-{index}" for index in range(1_000)]

    weights = {id_: sampler.weight(make_example(id_, 0)) for id_ in ids}

    for impression_id, weight in weights.items():
        expected = 1.0 if keep_fraction(impression_id) < RATE else 0.0
        assert weight == expected, impression_id


@pytest.mark.parametrize("correction", CORRECTIONS)
def test_rate_one_keeps_every_example(correction: str) -> None:
    sampler = NegativeSampler(1.0, correction)
    model = FixedProbabilityClassifier(0.2)

    weights = {sampler.weight(make_example(f"imp-{index}", index % 2)) for index in range(500)}

    assert weights == {1.0}
    assert sampler.wrap(model) is model


@pytest.mark.parametrize(
    ("rate", "correction"),
    [(0.0, "weight"), (-0.1, "weight"), (1.5, "recalibrate"), (0.1, "drop")],
)
def test_invalid_settings_rejected(rate: float, correction: str) -> None:
    with pytest.raises(ValueError):
        NegativeSampler(rate, correction)


# The recalibration.


def test_wrap_recalibrates_only_in_recalibrate_mode() -> None:
    model = FixedProbabilityClassifier(0.2)

    wrapped = NegativeSampler(RATE, "recalibrate").wrap(model)

    assert isinstance(wrapped, RecalibratedClassifier)
    assert wrapped.model is model
    assert wrapped.negative_rate == RATE
    assert NegativeSampler(RATE, "weight").wrap(model) is model


@pytest.mark.parametrize("probability", [0.0, 1e-6, 0.01, 0.3, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
def test_recalibration_formula_on_stub_model(probability: float, rate: float) -> None:
    model = RecalibratedClassifier(FixedProbabilityClassifier(probability), rate)

    scores = model.predict_proba_one({})

    # q = p / (p + (1 - p) / rate), written as p * rate / (p * rate + 1 - p).
    expected = probability * rate / (probability * rate + 1 - probability)
    assert scores[True] == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert scores[False] == 1.0 - scores[True]


def test_recalibration_of_known_values() -> None:
    def recalibrated(probability: float) -> float:
        model = RecalibratedClassifier(FixedProbabilityClassifier(probability), 0.1)
        return model.predict_proba_one({})[True]

    # p = 0.5 at rate 0.1: 0.5 / (0.5 + 0.5 / 0.1) = 1 / 11.
    assert recalibrated(0.5) == pytest.approx(1 / 11, rel=1e-12)
    # Sampled odds are the true odds over the rate, so odds of 10 (p = 10 / 11) map to 1 / 2.
    assert recalibrated(10 / 11) == pytest.approx(0.5, rel=1e-12)


def test_recalibrated_learn_passes_weight() -> None:
    stub = FixedProbabilityClassifier(0.2)
    model = RecalibratedClassifier(stub, RATE)

    model.learn_one({"a": 1}, True)
    model.learn_one({"a": 2}, False, w=3.0)

    assert stub.learned == [({"a": 1}, True, {}), ({"a": 2}, False, {"w": 3.0})]


# Calibration on a stream whose true click probabilities are known.


@dataclass(frozen=True)
class TailCalibration:
    """Mean prediction against the mean true probability over the evaluated impressions."""

    mean_prediction: float
    mean_true_probability: float
    learned_positives: int
    learned_negatives: int

    @property
    def relative_error(self) -> float:
        return self.mean_prediction / self.mean_true_probability - 1

    @property
    def tolerance(self) -> float:
        """Four relative standard errors of a click rate estimated from the learned examples.

        A model's mean prediction is about as precise as a direct estimate of
        the click odds from the examples it learned, and no more. Odds
        estimated from ``n1`` positives and ``n0`` kept negatives have a
        relative standard error of about ``sqrt(1 / n1 + 1 / n0)`` (delta
        method on the log odds), which is also the relative error of a click
        rate this far below one half.
        """
        return 4 * math.sqrt(1 / self.learned_positives + 1 / self.learned_negatives)


@pytest.fixture(scope="module")
def known_truth_stream() -> list[tuple[LabeledExample, float]]:
    """Return (example, true click probability) per impression, in event-time order.

    The label is the generator's drawn click itself, with no attribution
    window, so the true probability is exactly the probability of the label.
    """
    events, truth = generate(GeneratorSettings(seed=3, impressions=CALIBRATION_IMPRESSIONS))
    truth_by_id = {record.impression_id: record for record in truth}
    stream = []
    for event in events:
        if not isinstance(event, Impression):
            continue
        record = truth_by_id[event.impression_id]
        example = LabeledExample(
            impression=event,
            label=int(record.clicked),
            label_delay_seconds=0.0,
            label_source=LabelSource.CLICK if record.clicked else LabelSource.WINDOW_CLOSED,
            decided_at=event.event_time,
        )
        stream.append((example, record.true_probability))
    return stream


def learn_progressively(
    stream: list[tuple[LabeledExample, float]], sampler: NegativeSampler, model: base.Classifier
) -> TailCalibration:
    """Learn the sampled stream in order, scoring each evaluated impression before learning it."""
    evaluated_from = len(stream) - EVALUATED_IMPRESSIONS
    predictions: list[float] = []
    true_probabilities: list[float] = []
    learned = {0: 0, 1: 0}

    for index, (example, true_probability) in enumerate(stream):
        x = example.impression.learning_features()
        weight = sampler.weight(example)

        if index >= evaluated_from:
            predictions.append(model.predict_proba_one(x).get(True, 0.0))
            true_probabilities.append(true_probability)
            if weight > 0:
                learned[example.label] += 1

        if weight > 0:
            model.learn_one(x, bool(example.label), w=weight)

    return TailCalibration(
        mean_prediction=float(np.mean(predictions)),
        mean_true_probability=float(np.mean(true_probabilities)),
        learned_positives=learned[1],
        learned_negatives=learned[0],
    )


@pytest.mark.parametrize("model_name", WEIGHTED_MODELS)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_corrected_model_is_calibrated(
    known_truth_stream, correction: str, model_name: str
) -> None:
    sampler = NegativeSampler(RATE, correction)

    result = learn_progressively(known_truth_stream, sampler, sampler.wrap(build_model(model_name)))

    assert result.learned_positives > 1_000
    assert abs(result.relative_error) <= result.tolerance, result


@pytest.mark.parametrize("model_name", WEIGHTED_MODELS)
def test_uncorrected_model_is_miscalibrated(known_truth_stream, model_name: str) -> None:
    # The same kept examples with weight 1 and no recalibration. This shows the
    # calibration test can fail: with a tenth of the negatives, the model
    # predicts about six times the true click rate (relative error near +5).
    sampler = NegativeSampler(RATE, "recalibrate")

    result = learn_progressively(known_truth_stream, sampler, build_model(model_name))

    assert result.relative_error > 20 * result.tolerance, result
