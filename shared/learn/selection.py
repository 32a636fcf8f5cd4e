"""Online model selection: River's successive halving over named candidates, choices recorded.

Successive halving trains every candidate on the same examples and, at fixed
points called rungs, drops the worse half by a running metric until one is
left. The survivor then learns
alone. River's ``SuccessiveHalvingClassifier`` implements it. The subclass
here names the candidates and records what each learned and when it was
dropped, so that a replay can report what was chosen.

River 0.26's ``BanditClassifier`` was not used because its ``best_model``
and its epsilon-greedy exploitation take the arm with the largest metric
value, which under log loss is the worst arm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from river import base, compose, metrics, model_selection

CandidateStatus = Literal["racing", "eliminated", "selected"]

# Wrappers are unwrapped at most this many levels deep when looking for a selector.
_MAX_WRAPPER_DEPTH = 8


@dataclass(frozen=True, slots=True)
class Rung:
    """One cut of the race: when it happened and where each racing candidate stood."""

    learn_calls: int
    # The running metric of each candidate that reached this rung, by candidate index.
    metric_values: dict[int, float]
    dropped: list[int]


@dataclass(frozen=True, slots=True)
class CandidateReport:
    """The progress of one candidate of a selector so far."""

    name: str
    examples_learned: int
    # The selector's running metric of the candidate's pre-learn predictions,
    # over the examples it learned. None before its first example.
    metric_value: float | None
    status: CandidateStatus
    # Learn calls the selector had seen when it dropped this candidate.
    eliminated_after: int | None
    best: bool


class SuccessiveHalvingSelector(model_selection.SuccessiveHalvingClassifier):
    """River's successive halving over named candidates that reports its choices.

    ``budget`` is River's: the total number of candidate updates the race may
    spend. With ``n`` candidates River places the first rung after
    ``budget / (n * ceil(log(n, eta)))`` learn calls. Predictions come from the
    candidate with the best running metric, the first one before any learning.
    """

    def __init__(
        self,
        models: list[base.Classifier],
        metric: metrics.base.ClassificationMetric,
        budget: int,
        eta: int = 2,
        candidate_names: list[str] | None = None,
    ) -> None:
        super().__init__(models, metric, budget, eta)
        names = candidate_names or [f"candidate {index}" for index in range(len(models))]
        if len(names) != len(models):
            raise ValueError(
                f"got {len(names)} candidate names for {len(models)} models, "
                "but each model needs exactly one name"
            )
        self.candidate_names = names
        self.learn_calls = 0
        self.examples_learned = [0] * len(models)
        self.eliminated_after: list[int | None] = [None] * len(models)
        self.rungs: list[Rung] = []

    @property
    def _multiclass(self) -> bool:
        # River 0.26 defines this as a method on SuccessiveHalvingClassifier,
        # which is always truthy. The candidates here are binary.
        return False

    @property
    def racing(self) -> list[int]:
        """The indices of the candidates still learning."""
        # NOTE: River 0.26 keeps the race in these private attributes: the
        # first ``_s`` entries of ``_rankings`` are the candidates still in it.
        return list(self._rankings[: self._s])

    @property
    def best_index(self) -> int:
        """The index of the candidate that currently makes the predictions."""
        return self._best_model_idx

    def learn_one(self, x: dict, y: bool, w: float = 1.0) -> None:
        """Update every racing candidate, then record what was learned and who was dropped.

        River's successive halving takes no sample weight, so any weight but 1
        raises ValueError instead of being ignored.
        """
        if w != 1.0:
            raise ValueError(
                f"the successive-halving selector cannot learn with sample weight {w}, "
                "because River's successive halving takes no weights; use negative "
                "sampling with the recalibrate correction, which needs none"
            )
        racing = self.racing
        super().learn_one(x, y)

        self.learn_calls += 1
        for index in racing:
            self.examples_learned[index] += 1
        still_racing = set(self.racing)
        dropped = [index for index in racing if index not in still_racing]
        if dropped:
            for index in dropped:
                self.eliminated_after[index] = self.learn_calls
            values = {index: self._metrics[index].get() for index in racing}
            self.rungs.append(Rung(self.learn_calls, values, dropped))

    def candidates(self) -> list[CandidateReport]:
        """Report every candidate in the order given to the constructor."""
        racing = set(self.racing)
        reports = []
        for index, name in enumerate(self.candidate_names):
            learned = self.examples_learned[index]
            if index not in racing:
                status: CandidateStatus = "eliminated"
            elif len(racing) == 1:
                status = "selected"
            else:
                status = "racing"
            reports.append(
                CandidateReport(
                    name=name,
                    examples_learned=learned,
                    metric_value=self._metrics[index].get() if learned else None,
                    status=status,
                    eliminated_after=self.eliminated_after[index],
                    best=index == self.best_index,
                )
            )
        return reports


def find_selector(model: base.Estimator) -> SuccessiveHalvingSelector | None:
    """Return the selector inside a model, looking through wrappers and pipelines, or None.

    A wrapper is anything that keeps its inner model in ``model``, such as
    ``FakeNegativeCalibrated``. A pipeline is searched at its last step.
    """
    current: object = model
    for _ in range(_MAX_WRAPPER_DEPTH):
        if isinstance(current, SuccessiveHalvingSelector):
            return current
        if isinstance(current, compose.Pipeline):
            current = current[-1]
            continue
        inner = getattr(current, "model", None)
        if inner is None:
            return None
        current = inner
    return None
