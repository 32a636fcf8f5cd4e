"""Paired bootstrap confidence intervals for the difference of a metric between two models.

Both models scored the same examples, so each bootstrap replicate draws one
resample of example indices and evaluates both models on it. Keeping the
pairing removes the variance that the examples themselves share, which is
most of it: two models that disagree little get a narrow interval even when
each model's own metric is noisy.

A resample is represented by its weights: how many times each example was
drawn. Every metric here is written for a matrix of weights, one row per
replicate, so that a block of replicates is evaluated with a few vectorised
numpy operations instead of a Python loop. The same functions with a row of
ones give the metric of the full sample.

The intervals are percentile intervals: the equal-tailed quantiles of the
replicates' differences.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.metrics.binary import log_losses

# A block of replicates holds at most this many weights (32 MB as float64),
# so memory stays flat however many examples and replicates there are.
MAX_BLOCK_CELLS = 2**22

# A weighted metric maps (weights, scores, labels) to one value per weight
# row: weights has shape (replicates, examples), scores and labels (examples,).
# A value that is undefined on a resample, such as the AUC of a resample
# without clicks, is NaN.
WeightedMetric = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


# Metrics of weighted samples.


def weighted_log_loss(weights: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the mean log loss per weight row."""
    return weights @ log_losses(scores, labels) / weights.sum(axis=1)


def _entropy(rates: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -(rates * np.log(rates) + (1.0 - rates) * np.log1p(-rates))
    return np.where((rates > 0.0) & (rates < 1.0), entropy, np.nan)


def weighted_normalized_entropy(
    weights: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Return log loss over the entropy of the click rate per row, NaN without both classes."""
    click_rates = weights @ labels.astype(np.float64) / weights.sum(axis=1)
    return weighted_log_loss(weights, scores, labels) / _entropy(click_rates)


def weighted_calibration(weights: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return predicted over observed clicks per weight row, NaN without clicks."""
    observed = weights @ labels.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(observed > 0, (weights @ scores) / observed, np.nan)


def weighted_calibration_error(
    weights: np.ndarray, scores: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """Return ``|calibration - 1|`` per weight row: 0 is calibrated, either direction counts."""
    return np.abs(weighted_calibration(weights, scores, labels) - 1.0)


def weighted_auc(weights: np.ndarray, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the area under the ROC curve per weight row, NaN without both classes.

    It is the Mann-Whitney statistic with each example counted as often as its
    weight and tied scores counted as one half, the same as
    :func:`shared.metrics.binary.roc_auc` on the resample. The examples are
    sorted once for all rows. Each row then needs only the summed weight of
    the negatives between consecutive positive scores, which costs about one
    pass over the row where a full cumulative sum costs several.
    """
    positive = labels > 0
    positive_index = np.flatnonzero(positive)
    negative_index = np.flatnonzero(~positive)
    if positive_index.size == 0 or negative_index.size == 0:
        return np.full(weights.shape[0], np.nan)
    negative_index = negative_index[np.argsort(scores[negative_index], kind="stable")]
    negative_scores = scores[negative_index]
    positive_scores = scores[positive_index]
    # For each positive: how many sorted negatives score below it, and below or equal.
    below = np.searchsorted(negative_scores, positive_scores, side="left")
    below_or_tied = np.searchsorted(negative_scores, positive_scores, side="right")

    # Split the sorted negatives at every position a positive needs, and sum each piece.
    boundaries = np.unique(np.concatenate(([0], below, below_or_tied)))
    boundaries = boundaries[boundaries < negative_index.size]
    pieces = np.add.reduceat(np.take(weights, negative_index, axis=1), boundaries, axis=1)
    # Column k is the weight of the negatives before boundaries[k], and the last is all of them.
    cumulative = np.zeros((weights.shape[0], boundaries.size + 1))
    np.cumsum(pieces, axis=1, out=cumulative[:, 1:])
    below_weight = cumulative[:, np.searchsorted(boundaries, below)]
    below_or_tied_weight = cumulative[:, np.searchsorted(boundaries, below_or_tied)]

    positive_weights = weights[:, positive_index]
    # Each positive beats the negatives below it and ties half of those at its score.
    concordant = (positive_weights * (below_weight + below_or_tied_weight) / 2.0).sum(axis=1)
    pairs = positive_weights.sum(axis=1) * cumulative[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, concordant / pairs, np.nan)


@dataclass(frozen=True, slots=True)
class MetricDefinition:
    """A metric the comparison reports, and which direction of it is better."""

    name: str
    label: str
    compute: WeightedMetric
    higher_is_better: bool


# The metrics of an offline comparison, in report order.
COMPARED_METRICS = (
    MetricDefinition("log_loss", "log loss", weighted_log_loss, higher_is_better=False),
    MetricDefinition(
        "normalized_entropy", "normalised entropy", weighted_normalized_entropy, False
    ),
    MetricDefinition("auc", "AUC", weighted_auc, higher_is_better=True),
    MetricDefinition("calibration_error", "|calibration - 1|", weighted_calibration_error, False),
)


# Resampling.


def bootstrap_weights(count: int, samples: int, seed: int) -> Iterator[np.ndarray]:
    """Yield blocks of resample weights, ``samples`` rows in all, each row summing to ``count``.

    Row ``r`` counts how often each of the ``count`` examples was drawn, with
    replacement, into replicate ``r``. The same arguments always give the
    same rows.
    """
    if count < 1:
        raise ValueError(f"bootstrap needs at least 1 example, got {count}")
    if samples < 1:
        raise ValueError(f"bootstrap needs at least 1 resample, got {samples}")
    rng = np.random.default_rng(seed)
    rows_per_block = max(1, MAX_BLOCK_CELLS // count)
    done = 0
    while done < samples:
        rows = min(rows_per_block, samples - done)
        indices = rng.integers(0, count, size=(rows, count), dtype=np.int32)
        # One bincount for the block: row r's indices are shifted into [r * count, (r + 1) * count).
        shifted = indices + (np.arange(rows) * count)[:, None]
        counts = np.bincount(shifted.ravel(), minlength=rows * count)
        yield counts.reshape(rows, count).astype(np.float64)
        done += rows


@dataclass(frozen=True, slots=True)
class DifferenceInterval:
    """A metric's difference between two models (other minus reference) with its interval.

    ``low`` and ``high`` are None when fewer than half of the replicates
    defined the metric, for example an AUC on a stream with a handful of clicks.
    """

    estimate: float | None
    low: float | None
    high: float | None
    confidence_level: float
    samples: int
    # Replicates on which the metric was defined for both models.
    valid_samples: int

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0, so the difference is significant at its level."""
        if self.low is None or self.high is None:
            return False
        return self.low > 0.0 or self.high < 0.0

    def as_dict(self) -> dict[str, float | int | bool | None]:
        """Return the difference, its interval and significance as JSON-ready values."""
        return {
            "estimate": self.estimate,
            "low": self.low,
            "high": self.high,
            "valid_samples": self.valid_samples,
            "significant": self.significant,
        }


def percentile_interval(
    replicates: np.ndarray, confidence_level: float
) -> tuple[float, float] | None:
    """Return the equal-tailed percentile interval of the finite replicates, or None.

    None means that fewer than half of the replicates are finite, which leaves
    too few to place the tails.
    """
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0 or finite.size * 2 < replicates.size:
        return None
    tail = (1.0 - confidence_level) / 2.0
    low, high = np.quantile(finite, [tail, 1.0 - tail])
    return float(low), float(high)


def _full_sample_value(metric: WeightedMetric, scores: np.ndarray, labels: np.ndarray) -> float:
    value = float(metric(np.ones((1, scores.size)), scores, labels)[0])
    return value


def compare_paired(
    scores: Mapping[str, np.ndarray],
    labels: np.ndarray,
    metrics: Sequence[MetricDefinition] = COMPARED_METRICS,
    *,
    confidence_level: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, DifferenceInterval]]]:
    """Compute every metric of every model, and each model's difference to the first one.

    ``scores`` maps model names to their scores of the same examples, whose
    labels are ``labels``. The first model is the reference. Every model and
    metric is evaluated on the same resamples. Returns the metrics of the full
    sample per model, and the intervals per other model and metric.
    """
    names = list(scores)
    labels = np.asarray(labels)
    arrays = {name: np.asarray(values, dtype=np.float64) for name, values in scores.items()}
    for name, values in arrays.items():
        if values.shape != labels.shape:
            raise ValueError(
                f"model {name!r} has {values.size} scores for {labels.size} labels, "
                "but needs one score per labelled example"
            )

    values: dict[str, dict[str, float | None]] = {
        name: {
            metric.name: _finite_or_none(_full_sample_value(metric.compute, arrays[name], labels))
            for metric in metrics
        }
        for name in names
    }

    replicates = {(name, metric.name): [] for name in names for metric in metrics}
    for weights in bootstrap_weights(labels.size, samples, seed):
        for name in names:
            for metric in metrics:
                replicates[name, metric.name].append(metric.compute(weights, arrays[name], labels))

    reference = names[0]
    differences: dict[str, dict[str, DifferenceInterval]] = {}
    for name in names[1:]:
        differences[name] = {}
        for metric in metrics:
            other = np.concatenate(replicates[name, metric.name])
            base = np.concatenate(replicates[reference, metric.name])
            differences[name][metric.name] = _interval(
                values[name][metric.name],
                values[reference][metric.name],
                other - base,
                confidence_level,
            )
    return values, differences


def paired_bootstrap(
    metric: WeightedMetric,
    scores_reference: np.ndarray,
    scores_other: np.ndarray,
    labels: np.ndarray,
    *,
    confidence_level: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> DifferenceInterval:
    """Return ``metric(other) - metric(reference)`` on the same examples, with its interval."""
    definition = MetricDefinition("metric", "metric", metric, higher_is_better=False)
    _, differences = compare_paired(
        {"reference": scores_reference, "other": scores_other},
        labels,
        [definition],
        confidence_level=confidence_level,
        samples=samples,
        seed=seed,
    )
    return differences["other"]["metric"]


def _interval(
    other: float | None,
    reference: float | None,
    differences: np.ndarray,
    confidence_level: float,
) -> DifferenceInterval:
    estimate = None if other is None or reference is None else other - reference
    bounds = percentile_interval(differences, confidence_level)
    low, high = bounds if bounds is not None else (None, None)
    return DifferenceInterval(
        estimate=estimate,
        low=low,
        high=high,
        confidence_level=confidence_level,
        samples=differences.size,
        valid_samples=int(np.isfinite(differences).sum()),
    )


def _finite_or_none(value: float) -> float | None:
    return value if np.isfinite(value) else None
