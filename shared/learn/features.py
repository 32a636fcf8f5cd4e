"""Running click-rate features, learned only from labels already revealed.

For each categorical feature value (an item, a category, a user), the
transformer keeps how many labelled examples it has seen and how many were
clicks, and adds the smoothed click rate as a log-odds feature relative to the
overall rate. It is a River supervised transformer: a Pipeline transforms an
example with the counts from before that example's own label is added, and
the counts only grow when ``learn_one`` is called, which happens when the
join reveals a label. So no feature ever includes a label from the future.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from river import base

# Log-odds are clipped so a value seen once cannot dominate the dot product.
MAX_LOG_ODDS = 4.0


def _logit(rate: float) -> float:
    return math.log(rate / (1.0 - rate))


class RunningClickRates(base.Transformer):
    """Add ``rate:<feature>``, the smoothed log-odds lift of each categorical value.

    Parameters
    ----------
    features
        Names of the categorical features to track; None tracks every string or
        boolean feature present.
    prior_strength
        Pseudo-examples of the overall rate added to every value's counts, so a
        value seen a few times stays near the overall rate.
    keep_raw
        Whether the output keeps the input features next to the new ones.
    with_counts
        Whether to add ``count:<feature>``, log(1 + examples seen), so the model
        can learn how far to trust each rate.
    """

    def __init__(
        self,
        features: Sequence[str] | None = None,
        prior_strength: float = 20.0,
        keep_raw: bool = True,
        with_counts: bool = False,
    ) -> None:
        self.features = tuple(features) if features is not None else None
        self.prior_strength = prior_strength
        self.keep_raw = keep_raw
        self.with_counts = with_counts
        self.examples = 0.0
        self.clicks = 0.0
        # (feature, value) -> [examples, clicks]
        self.counts: dict[tuple[str, str], list[float]] = {}

    @property
    def _supervised(self) -> bool:
        # River 0.26's Pipeline recognises transformers by base.Transformer
        # only, so a base.SupervisedTransformer would be run as a final step.
        # This class is a Transformer whose _supervised flag makes the Pipeline pass labels.
        return True

    def _tracked(self, x: dict) -> list[tuple[str, str]]:
        names = self.features if self.features is not None else x.keys()
        pairs = []
        for name in names:
            value = x.get(name)
            if isinstance(value, str | bool):
                pairs.append((name, str(value)))
        return pairs

    def overall_rate(self) -> float:
        """Return the overall click rate of the revealed labels, smoothed towards 1 %."""
        return (self.clicks + 0.01 * self.prior_strength) / (self.examples + self.prior_strength)

    def transform_one(self, x: dict) -> dict:
        overall = self.overall_rate()
        overall_logit = _logit(overall)
        features = dict(x) if self.keep_raw else {}
        features["rate:__overall__"] = overall_logit
        for name, value in self._tracked(x):
            seen, clicked = self.counts.get((name, value), (0.0, 0.0))
            rate = (clicked + overall * self.prior_strength) / (seen + self.prior_strength)
            lift = max(-MAX_LOG_ODDS, min(MAX_LOG_ODDS, _logit(rate) - overall_logit))
            features[f"rate:{name}"] = lift
            if self.with_counts:
                features[f"count:{name}"] = math.log1p(seen)
        return features

    def learn_one(self, x: dict, y: base.typing.ClfTarget = None, w: float = 1.0) -> None:
        click = w * float(bool(y))
        self.examples += w
        self.clicks += click
        for key in self._tracked(x):
            counts = self.counts.get(key)
            if counts is None:
                counts = self.counts[key] = [0.0, 0.0]
            counts[0] += w
            counts[1] += click


class ScaleNumeric(base.Transformer):
    """Standardise numeric features with running means and variances; pass the rest through.

    Booleans and strings are left alone, so the hashed categorical features and
    the scaled numbers can share one feature dict. Statistics change only in
    ``learn_one``, never while scoring.
    """

    def __init__(self) -> None:
        # name -> [count, mean, sum of squared deviations] (Welford)
        self.stats: dict[str, list[float]] = {}

    def learn_one(self, x: dict) -> None:
        for name, value in x.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            stats = self.stats.get(name)
            if stats is None:
                stats = self.stats[name] = [0.0, 0.0, 0.0]
            stats[0] += 1
            delta = value - stats[1]
            stats[1] += delta / stats[0]
            stats[2] += delta * (value - stats[1])

    def transform_one(self, x: dict) -> dict:
        scaled = {}
        for name, value in x.items():
            stats = self.stats.get(name)
            if stats is None or isinstance(value, bool) or not isinstance(value, int | float):
                scaled[name] = value
                continue
            variance = stats[2] / stats[0] if stats[0] > 1 else 0.0
            scaled[name] = (value - stats[1]) / math.sqrt(variance) if variance > 0 else 0.0
        return scaled
