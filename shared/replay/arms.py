"""Arms: several learners replayed side by side on the same examples.

Every arm scores every impression and receives every label, in the same order, so
their per-example losses pair up. That pairing is what makes an offline A/B
comparison and the freshness experiment fair: the arms differ only in their
model or in when they are allowed to learn.

An arm learns in one of three schedules:

- ``continuous``: online, as live training does;
- ``frozen``: online until a point in event time, then never again;
- ``retrain``: online until a point in event time, then frozen between
  rebuilds, each a new model trained from scratch on every label decided so
  far, once per period, like a daily batch job.

"Until a point in event time" counts impression time: an impression served
before the point is learned even when its label is decided after it, the way
a training set cut at a date keeps the labels of that date's impressions.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Literal

from river import base

from shared.events import Impression, LabeledExample
from shared.learn.learner import OnlineLearner, Scores
from shared.learn.models import build_model

logger = logging.getLogger(__name__)

Schedule = Literal["continuous", "frozen", "retrain"]


@dataclass(frozen=True, slots=True)
class ArmSpec:
    """The registry model an arm runs, and the schedule it learns in."""

    name: str
    model: str
    schedule: Schedule = "continuous"
    # Impressions at or after this event time are not learned (frozen, retrain).
    learn_until: float | None = None
    # Seconds of event time between two rebuilds of a retrain arm.
    retrain_every: float | None = None


@dataclass
class Retrain:
    """One rebuild of a retrain arm: when, and on how many examples."""

    event_time: float
    examples: int


@dataclass
class ReplayArm:
    """One learner with its schedule, its served scores and its evaluation."""

    spec: ArmSpec
    learner: OnlineLearner
    retrains: list[Retrain] = field(default_factory=list)
    # Every decided example as (features, label), kept only by retrain arms.
    _history: list[tuple[dict, bool]] = field(default_factory=list)
    _next_retrain_at: float | None = None

    def __post_init__(self) -> None:
        spec = self.spec
        if spec.schedule == "retrain" and spec.learn_until is not None:
            assert spec.retrain_every is not None, "a retrain arm needs retrain_every"
            self._next_retrain_at = spec.learn_until + spec.retrain_every

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> str:
        """The arm's name as a column-name-safe word, e.g. ``ctr_frozen``."""
        return re.sub(r"[^0-9A-Za-z]+", "_", self.spec.name).strip("_").lower()

    def learns(self, impression: Impression) -> bool:
        """Return whether this arm still learns from an impression and its label."""
        until = self.spec.learn_until
        return until is None or impression.ts < until

    def serve(self, impression: Impression) -> Scores:
        """Score an impression as served, rebuilding first if a retrain is due."""
        if self._next_retrain_at is not None and impression.ts >= self._next_retrain_at:
            self._retrain(impression.ts)
        scores = self.learner.score(impression)
        if self.learns(impression):
            self.learner.on_served(impression)
        return scores

    def learn(self, example: LabeledExample, served: Scores | None, evaluate: bool) -> None:
        """Learn a decided example if the schedule allows it, and evaluate it if asked."""
        impression = example.impression
        if self.spec.schedule == "retrain":
            self._history.append((impression.learning_features(), bool(example.label)))

        if self.learns(impression):
            self.learner.learn(example, served, evaluate=evaluate)
        elif evaluate:
            self.learner.observe(example, served)

    def _retrain(self, event_time: float) -> None:
        # Several periods may pass without an impression; one rebuild covers them.
        every = self.spec.retrain_every
        assert self._next_retrain_at is not None and every is not None
        while self._next_retrain_at <= event_time:
            self._next_retrain_at += every

        model: base.Classifier = build_model(self.spec.model)
        for x, y in self._history:
            model.learn_one(x, y)
        self.learner.model = model
        self.retrains.append(Retrain(event_time=event_time, examples=len(self._history)))
        logger.debug(
            "arm %s retrained from scratch on %d examples at event time %.0f",
            self.name,
            len(self._history),
            event_time,
        )
