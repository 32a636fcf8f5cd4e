"""Negative downsampling: learn from a share of the negatives and correct for it.

Click logs are mostly negatives, so learning from a random share of them cuts
the cost of training almost in proportion. Two corrections keep predictions
calibrated (He et al., "Practical Lessons from Predicting Clicks on Ads at
Facebook", ADKDD 2014):

- ``weight``: learn each kept negative with weight 1 / rate;
- ``recalibrate``: learn kept negatives with weight 1, then map a prediction
  p made on the sampled distribution back with q = p / (p + (1 - p) / rate).

The decision to keep a negative hashes its impression id, so replays,
restarts and every trainer replica keep the same negatives.
"""

from __future__ import annotations

import hashlib

from river import base

from shared.events import LabeledExample

_HASH_SPACE = float(2**64)


def keep_fraction(impression_id: str) -> float:
    """Return a uniform number in [0, 1) derived from the impression id."""
    digest = hashlib.blake2b(impression_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE


class NegativeSampler:
    """Decide which examples to learn, and with which weight."""

    def __init__(self, rate: float, correction: str = "recalibrate") -> None:
        if not 0 < rate <= 1:
            raise ValueError(f"negative sampling rate must be in (0, 1], got {rate}")
        if correction not in ("weight", "recalibrate"):
            raise ValueError(
                f"unknown negative sampling correction {correction!r}; use weight or recalibrate"
            )
        self.rate = rate
        self.correction = correction

    def weight(self, example: LabeledExample) -> float:
        """Return the learning weight, or 0 when the example is sampled out."""
        if example.label == 1 or self.rate == 1.0:
            return 1.0
        if keep_fraction(example.impression.impression_id) >= self.rate:
            return 0.0
        return 1.0 / self.rate if self.correction == "weight" else 1.0

    def wrap(self, model: base.Classifier) -> base.Classifier:
        """Return the model to learn, wrapped to recalibrate its predictions when needed."""
        if self.correction == "recalibrate" and self.rate < 1.0:
            return RecalibratedClassifier(model, self.rate)
        return model


class _CalibratingWrapper(base.Classifier):
    """A binary classifier that learns through an inner model and maps its probabilities."""

    def __init__(self, model: base.Classifier) -> None:
        self.model = model

    @property
    def _multiclass(self) -> bool:
        return False

    def learn_one(self, x, y, w: float = 1.0) -> None:
        # Not every River model takes a weight; pass it only when it matters.
        if w == 1.0:
            self.model.learn_one(x, y)
        else:
            self.model.learn_one(x, y, w=w)


class RecalibratedClassifier(_CalibratingWrapper):
    """A classifier trained on downsampled negatives, predicting on the original scale."""

    def __init__(self, model: base.Classifier, negative_rate: float) -> None:
        super().__init__(model)
        self.negative_rate = negative_rate

    def predict_proba_one(self, x) -> dict[bool, float]:
        p = self.model.predict_proba_one(x).get(True, 0.0)
        q = p / (p + (1.0 - p) / self.negative_rate) if p > 0 else 0.0
        return {False: 1.0 - q, True: q}


class FakeNegativeCalibrated(_CalibratingWrapper):
    """A model trained with fake negatives, predicting calibrated click probabilities.

    Fake-negative calibration (Ktena et al., "Addressing Delayed Feedback for
    Continuous Training with Neural Networks in CTR prediction", RecSys 2019):
    every impression is learned as a negative when it is served, and a click
    adds a positive when it arrives. Each impression then gives one negative
    and, if clicked, one positive, so the inner model estimates
    b = p / (1 + p), and ``predict_proba_one`` returns p = b / (1 - b).
    Because negatives are learned at once, the model never learns a stretch of
    positives alone, which is what biases delayed training at start-up.
    """

    # b = p / (1 + p) cannot exceed 1/2; a larger inner estimate means p = 1.
    MAX_INNER_PROBABILITY = 0.5

    def predict_proba_one(self, x) -> dict[bool, float]:
        inner = self.model.predict_proba_one(x).get(True, 0.0)
        inner = min(inner, self.MAX_INNER_PROBABILITY)
        p = min(1.0, inner / (1.0 - inner))
        return {False: 1.0 - p, True: p}
