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

A rebuild is due at ``learn_until + k * retrain_every`` for k = 1, 2, ... Its
training set is fixed when the arm first handles an impression served, or a
label decided, at or after that time. The set is every label the join had
released before, in release order. Each late-click correction turns its
impression's negative into a positive, as a batch job reading the final
labels would. The new model learns that set in one pass and serves from the
first impression at or after the due time. A rebuild due after the last
impression never runs.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Literal

from river import base

from shared.events import Impression, LabeledExample, LabelSource
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
    """One rebuild of a retrain arm: when it was due, and how many examples it learned."""

    # The scheduled event time, learn_until plus a whole number of periods.
    event_time: float
    examples: int


@dataclass
class ReplayArm:
    """One learner with its schedule, its served scores and its evaluation."""

    spec: ArmSpec
    learner: OnlineLearner
    retrains: list[Retrain] = field(default_factory=list)
    # Every decided example's features and label, kept only by retrain arms.
    _features: list[dict] = field(default_factory=list)
    _labels: bytearray = field(default_factory=bytearray)
    # Position of each impression's example, so that a late-click correction
    # can turn that negative into a positive.
    _positions: dict[str, int] = field(default_factory=dict)
    _next_retrain_at: float | None = None
    # The training set of a rebuild that is due but not yet built: its due
    # time, its size and its labels as they were when it was fixed.
    _pending: tuple[float, int, bytes] | None = None

    def __post_init__(self) -> None:
        spec = self.spec
        if spec.schedule != "retrain":
            return
        if spec.learn_until is None or spec.retrain_every is None or spec.retrain_every <= 0:
            raise ValueError(
                f"retrain arm {spec.name!r} needs learn_until and a positive retrain_every, "
                f"got {spec.learn_until} and {spec.retrain_every}"
            )
        self._next_retrain_at = spec.learn_until + spec.retrain_every

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def key(self) -> str:
        """The arm's name as a column-name-safe word, e.g. ``ctr_frozen``."""
        return re.sub(r"[^0-9A-Za-z]+", "_", self.spec.name).strip("_").lower()

    def learns(self, impression: Impression) -> bool:
        """Return whether this arm still learns online from an impression and its label."""
        if self.retrains:
            # A rebuilt model is a batch model: it changes only at the next rebuild.
            return False
        until = self.spec.learn_until
        return until is None or impression.ts < until

    def serve(self, impression: Impression) -> Scores:
        """Score an impression as served, rebuilding first if a retrain is due."""
        if self._next_retrain_at is not None:
            self._fix_training_set_if_due(impression.ts)
            if self._pending is not None:
                self._rebuild()
        scores = self.learner.score(impression)
        if self.learns(impression):
            self.learner.on_served(impression)
        return scores

    def learn(self, example: LabeledExample, served: Scores | None, evaluate: bool) -> None:
        """Learn a decided example if the schedule allows it, and evaluate it if asked."""
        impression = example.impression
        if self._next_retrain_at is not None:
            self._fix_training_set_if_due(example.decided_at.timestamp())
            self._remember(example)

        if self.learns(impression):
            self.learner.learn(example, served, evaluate=evaluate)
        elif evaluate:
            self.learner.observe(example, served)

    def _remember(self, example: LabeledExample) -> None:
        impression_id = example.impression.impression_id
        position = self._positions.get(impression_id)
        if example.label_source == LabelSource.LATE_CLICK_CORRECTION and position is not None:
            self._labels[position] = 1
            return
        self._positions[impression_id] = len(self._features)
        self._features.append(example.impression.learning_features())
        self._labels.append(example.label)

    def _fix_training_set_if_due(self, event_time: float) -> None:
        due_at = self._next_retrain_at
        if due_at is None or event_time < due_at:
            return

        # Several periods may pass without an event; one rebuild, at the
        # latest time due, covers them.
        every = self.spec.retrain_every
        assert every is not None
        due_at += math.floor((event_time - due_at) / every) * every
        self._next_retrain_at = due_at + every
        self._pending = (due_at, len(self._features), bytes(self._labels))

    def _rebuild(self) -> None:
        assert self._pending is not None
        due_at, size, labels = self._pending
        self._pending = None

        # The rebuilt model learns final labels, with no label still pending,
        # so it predicts click probabilities directly: no fake-negative wrapper.
        model: base.Classifier = build_model(self.spec.model)
        for x, y in zip(self._features[:size], labels, strict=True):
            model.learn_one(x, bool(y))
        self.learner.model = model
        self.retrains.append(Retrain(event_time=due_at, examples=size))
        logger.debug(
            "arm %s retrained from scratch on %d examples, due at event time %.0f",
            self.name,
            size,
            due_at,
        )
