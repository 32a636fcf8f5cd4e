"""Progressive learning with delayed labels.

The learner scores each impression when it arrives, as a scorer serving the
current model would, and learns from it only when its label is decided. The
metrics compare that served score with the label, which is what River's
``evaluate.progressive_val_score`` does with ``moment`` and ``delay``. The
score just before learning is recorded too: the gap between the two is the
cost of the label delay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from river import base, compose

from shared.events import Impression, LabeledExample, LabelSource
from shared.learn.models import (
    BASELINE_MODEL,
    DEFAULT_MODEL,
    ScoringLogisticRegression,
    build_model,
)
from shared.learn.sampling import FakeNegativeCalibrated
from shared.metrics.evaluation import ProgressiveEvaluation

logger = logging.getLogger(__name__)


# How the model copes with labels that arrive late. "none" learns each example
# when its label is decided. "fake_negative" learns every impression as a
# negative when served and calibrates (see FakeNegativeCalibrated).
DelayedFeedback = Literal["none", "fake_negative"]


@dataclass(frozen=True, slots=True)
class Scores:
    """The model's and the baseline's click probability for one impression."""

    model: float
    baseline: float


def learn_and_score(model: base.Classifier, x: dict, y: bool, weight: float = 1.0) -> float:
    """Learn one example and return the model's probability for it from just before learning."""
    final = model[-1] if isinstance(model, compose.Pipeline) else model
    if isinstance(final, ScoringLogisticRegression):
        _learn(model, x, y, weight)
        assert final.last_learn_probability is not None
        return final.last_learn_probability
    probability = model.predict_proba_one(x).get(True, 0.0)
    _learn(model, x, y, weight)
    return probability


def _learn(model: base.Classifier, x: dict, y: bool, weight: float) -> None:
    # Not every River model takes a weight; pass it only when it matters.
    if weight == 1.0:
        model.learn_one(x, y)
    else:
        model.learn_one(x, y, w=weight)


class OnlineLearner:
    """A model and its baseline, learning from labelled examples as they are decided."""

    def __init__(
        self,
        model_name: str = DEFAULT_MODEL,
        model: base.Classifier | None = None,
        baseline: base.Classifier | None = None,
        evaluation: ProgressiveEvaluation | None = None,
        delayed_feedback: DelayedFeedback = "none",
    ) -> None:
        self.model_name = model_name
        model = model if model is not None else build_model(model_name)
        if delayed_feedback == "fake_negative" and not isinstance(model, FakeNegativeCalibrated):
            model = FakeNegativeCalibrated(model)
        self.model = model
        self.baseline = baseline if baseline is not None else build_model(BASELINE_MODEL)
        self.evaluation = evaluation or ProgressiveEvaluation()
        self.delayed_feedback = delayed_feedback
        self.examples_learned = 0

    def on_served(self, impression: Impression) -> None:
        """Learn a served impression as a fake negative, under fake-negative calibration.

        Call it once per impression, right after it is scored; it does nothing
        in the default mode. The baseline is left alone: it stays the running
        click rate of revealed labels.
        """
        if self.delayed_feedback == "fake_negative":
            self.model.learn_one(impression.learning_features(), False)

    def score(self, impression: Impression) -> Scores:
        """Return the current probabilities for an impression without learning anything."""
        x = impression.learning_features()
        return Scores(
            model=self.model.predict_proba_one(x).get(True, 0.0),
            baseline=self.baseline.predict_proba_one(x).get(True, 0.0),
        )

    def learn(
        self,
        example: LabeledExample,
        served: Scores | None,
        weight: float = 1.0,
        evaluate: bool = True,
    ) -> None:
        """Learn one example and, unless ``evaluate`` is false, add it to the metrics.

        ``served`` contains the scores from when the impression was served; None
        when they are unknown. A late-click correction is learned but not
        scored again: its impression was already scored at its first label.
        ``weight`` is the example's importance for models that take one; the
        baseline always learns with the same weight. A replay with a time
        holdout learns examples before the holdout without evaluating them.
        """
        x = example.impression.learning_features()
        y = bool(example.label)

        if self.delayed_feedback == "fake_negative" and not y:
            # The negative was learned when the impression was served.
            model_prelearn = self.model.predict_proba_one(x).get(True, 0.0)
        else:
            model_prelearn = learn_and_score(self.model, x, y, weight)
        prelearn = Scores(
            model=model_prelearn,
            baseline=learn_and_score(self.baseline, x, y, weight),
        )
        self.examples_learned += 1

        if evaluate and example.label_source != LabelSource.LATE_CLICK_CORRECTION:
            self.evaluation.update(example, served, prelearn)

    def observe(self, example: LabeledExample, served: Scores | None) -> None:
        """Add an example to the served-score metrics without learning it or scoring it again."""
        if example.label_source != LabelSource.LATE_CLICK_CORRECTION:
            self.evaluation.update(example, served, None)
