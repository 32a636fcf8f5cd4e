"""The registry of named River models.

Every model maps a flat feature dict (strings, numbers, booleans) to a click
probability. Each entry builds a fresh, untrained model, so two runs with the
same name and stream give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from river import base, compose, linear_model, metrics, optim, preprocessing, tree

from shared.errors import ConfigError
from shared.learn.features import RunningClickRates, ScaleNumeric
from shared.learn.selection import SuccessiveHalvingSelector

# Hashed feature space: 2**20 buckets keep collisions rare for a few hundred
# thousand distinct feature values and cost 8 MB per dense weight vector only
# when touched (River stores weights sparsely).
HASH_BUCKETS = 2**20
HASH_SEED = 20_241_204


class ScoringLogisticRegression(linear_model.LogisticRegression):
    """Logistic regression that keeps the probability it computed while learning.

    ``learn_one`` computes the prediction with the weights from before the
    update to get the gradient. Keeping it gives the pre-learn score for free
    instead of a second ``predict_proba_one``.
    """

    last_learn_probability: float | None = None
    _last_raw: float = 0.0
    _learning: bool = False

    def _raw_dot_one(self, x: dict) -> float:
        raw = super()._raw_dot_one(x)
        # Only the learning path records it: scoring must never write to the model.
        if self._learning:
            self._last_raw = raw
        return raw

    def learn_one(self, x, y, w=1.0):  # noqa: D102 - River's signature
        self._learning = True
        try:
            super().learn_one(x, y, w)
        finally:
            self._learning = False
        self.last_learn_probability = self.loss.mean_func(self._last_raw)


class RunningClickRate(base.Classifier):
    """The baseline: the running click rate, with a weak Beta prior for the first examples.

    It predicts ``(clicks + prior_rate * prior_strength) / (examples + prior_strength)``
    and ignores the features.
    """

    def __init__(self, prior_rate: float = 0.01, prior_strength: float = 10.0) -> None:
        self.prior_rate = prior_rate
        self.prior_strength = prior_strength
        self.clicks = 0.0
        self.examples = 0.0

    @property
    def _multiclass(self) -> bool:
        return False

    def learn_one(self, x, y, w: float = 1.0) -> None:
        self.clicks += w * float(bool(y))
        self.examples += w

    def predict_proba_one(self, x) -> dict[bool, float]:
        rate = (self.clicks + self.prior_rate * self.prior_strength) / (
            self.examples + self.prior_strength
        )
        return {False: 1.0 - rate, True: rate}


def _logit(rate: float) -> float:
    return math.log(rate / (1.0 - rate))


def build_logreg(
    learning_rate: float = 0.05,
    l2: float = 1.0,
    initial_rate: float = 0.01,
    intercept_learning_rate: float = 0.01,
) -> base.Classifier:
    """Hashed features into logistic regression trained with FTRL-Proximal.

    The intercept starts at the logit of ``initial_rate`` because click rates
    are far from 0.5, where a zero intercept would put the first predictions.
    """
    return compose.Pipeline(
        preprocessing.FeatureHasher(n_features=HASH_BUCKETS, seed=HASH_SEED),
        ScoringLogisticRegression(
            optimizer=optim.FTRLProximal(alpha=learning_rate, beta=1.0, l1=0.0, l2=l2),
            intercept_init=_logit(initial_rate),
            intercept_lr=intercept_learning_rate,
        ),
    )


def build_ctr(
    learning_rate: float = 0.03,
    l2: float = 1.0,
    initial_rate: float = 0.01,
    rate_prior_strength: float = 20.0,
) -> base.Classifier:
    """Scaled numbers, running click rates and hashed features into FTRL logistic regression.

    Numeric features are standardised with running statistics. Each categorical
    value gets its running click rate as a log-odds lift over the overall rate,
    learned only from labels already revealed. Raw categorical values and
    those lifts are hashed into a logistic regression trained with
    FTRL-Proximal. ``docs/models.md`` explains the choices.
    """
    return compose.Pipeline(
        ScaleNumeric(),
        RunningClickRates(prior_strength=rate_prior_strength),
        preprocessing.FeatureHasher(n_features=HASH_BUCKETS, seed=HASH_SEED),
        ScoringLogisticRegression(
            optimizer=optim.FTRLProximal(alpha=learning_rate, beta=1.0, l1=0.0, l2=l2),
            intercept_init=_logit(initial_rate),
            intercept_lr=0.01,
        ),
    )


def build_hoeffding(grace_period: int = 500, delta: float = 1e-5) -> base.Classifier:
    """Build a Hoeffding tree with naive Bayes adaptive leaves that splits on raw categories."""
    return tree.HoeffdingTreeClassifier(
        grace_period=grace_period, delta=delta, leaf_prediction="nba"
    )


def build_prior(prior_rate: float = 0.01, prior_strength: float = 10.0) -> base.Classifier:
    """Build the running click rate, the baseline every model is compared with."""
    return RunningClickRate(prior_rate=prior_rate, prior_strength=prior_strength)


def build_select(
    learning_rates: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3),
    budget: int = 80_000,
    eta: int = 2,
) -> base.Classifier:
    """Race the ctr model at several FTRL learning rates by successive halving on log loss.

    Every candidate learns each example until River's successive halving drops
    the worse half by running log loss, and the survivor then learns alone. With
    four candidates and eta 2, two remain after budget / 8 learn calls and one
    after budget / 4. ``shared/learn/selection.py`` records the choices.
    """
    return SuccessiveHalvingSelector(
        [build_ctr(learning_rate=rate) for rate in learning_rates],
        metric=metrics.LogLoss(),
        budget=budget,
        eta=eta,
        candidate_names=[f"ctr alpha={rate:g}" for rate in learning_rates],
    )


@dataclass(frozen=True)
class ModelSpec:
    """A named way to build a model."""

    name: str
    build: Callable[..., base.Classifier]

    @property
    def description(self) -> str:
        """The first line of the builder's docstring."""
        return (self.build.__doc__ or "").strip().splitlines()[0]


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("ctr", build_ctr),
        ModelSpec("logreg", build_logreg),
        ModelSpec("hoeffding", build_hoeffding),
        ModelSpec("prior", build_prior),
        ModelSpec("select", build_select),
    )
}
DEFAULT_MODEL = "ctr"
BASELINE_MODEL = "prior"


def build_model(name: str, **params: object) -> base.Classifier:
    """Build a fresh model from the registry by name."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    return spec.build(**params)
