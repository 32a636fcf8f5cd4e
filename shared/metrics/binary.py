"""Binary-outcome metrics with exact AUC, overall and over a rolling window.

Click-through rates sit near zero, so the usual fixed-threshold ROC
approximation (River's ``metrics.ROCAUC``) collapses every score into its
lowest bucket and reads about 0.5. The AUC here is exact: it ranks the stored
scores when asked, counting tied scores as half-concordant.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

# River's LogLoss clamps probabilities to the same interval.
PROBABILITY_EPSILON = 1e-15


def log_loss_one(probability: float, label: int) -> float:
    """Return the log loss of one prediction, in nats."""
    p = min(max(probability, PROBABILITY_EPSILON), 1.0 - PROBABILITY_EPSILON)
    return -math.log(p) if label else -math.log(1.0 - p)


def log_losses(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Return the log loss of each prediction in nats, clamped like :func:`log_loss_one`."""
    clamped = np.clip(scores, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON)
    return -np.where(labels > 0, np.log(clamped), np.log1p(-clamped))


def binary_entropy(rate: float) -> float:
    """Return the entropy in nats of a Bernoulli variable with the given rate."""
    if rate <= 0.0 or rate >= 1.0:
        return 0.0
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Return the exact area under the ROC curve, or None without both classes.

    It is the Mann-Whitney statistic: the share of (positive, negative) pairs
    ranked correctly, with ties counted as one half.
    """
    labels = np.asarray(labels, dtype=bool)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return None
    scores = np.asarray(scores, dtype=float)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # The average rank of each distinct score, 1-based, shared by its ties.
    upper = np.cumsum(counts)
    average_rank = upper - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][labels].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


@dataclass(frozen=True, slots=True)
class BinaryReport:
    """Metrics of a set of predictions against their labels."""

    count: int
    positives: int
    log_loss: float | None
    normalized_entropy: float | None
    auc: float | None
    calibration: float | None
    mean_prediction: float | None

    @property
    def click_rate(self) -> float | None:
        """The share of positive labels."""
        return self.positives / self.count if self.count else None

    def as_dict(self) -> dict[str, float | int | None]:
        """Return the metrics as a plain dict, with the click rate."""
        return {
            "count": self.count,
            "positives": self.positives,
            "click_rate": self.click_rate,
            "log_loss": self.log_loss,
            "normalized_entropy": self.normalized_entropy,
            "auc": self.auc,
            "calibration": self.calibration,
            "mean_prediction": self.mean_prediction,
        }


def _report(
    count: int, positives: int, loss_sum: float, prediction_sum: float, auc: float | None
) -> BinaryReport:
    if count == 0:
        return BinaryReport(0, 0, None, None, None, None, None)
    log_loss = loss_sum / count
    entropy = binary_entropy(positives / count)
    return BinaryReport(
        count=count,
        positives=positives,
        log_loss=log_loss,
        # Normalised entropy (He et al., ADKDD 2014): log loss relative to
        # always predicting the observed click rate of the same examples.
        normalized_entropy=log_loss / entropy if entropy > 0 else None,
        auc=auc,
        # Expected over observed clicks: 1.0 is calibrated, above 1 over-predicts.
        calibration=prediction_sum / positives if positives else None,
        mean_prediction=prediction_sum / count,
    )


class BinaryMetrics:
    """Log loss, normalised entropy, calibration and exact AUC over every example seen.

    Scores are kept (8 bytes each, labels 1 byte) so the AUC stays exact; use
    :class:`RollingBinaryMetrics` where the stream has no end.
    """

    def __init__(self, keep_scores: bool = True) -> None:
        self.count = 0
        self.positives = 0
        self.loss_sum = 0.0
        self.prediction_sum = 0.0
        self.keep_scores = keep_scores
        self._scores = array("d")
        self._labels = array("b")

    def update(self, probability: float, label: int) -> float:
        """Add one prediction and its label; return its log loss."""
        loss = log_loss_one(probability, label)
        self.count += 1
        self.positives += label
        self.loss_sum += loss
        self.prediction_sum += probability
        if self.keep_scores:
            self._scores.append(probability)
            self._labels.append(label)
        return loss

    def report(self) -> BinaryReport:
        """Return the metrics so far."""
        auc = None
        if self.keep_scores:
            auc = roc_auc(np.frombuffer(self._scores), np.frombuffer(self._labels, dtype=np.int8))
        return _report(self.count, self.positives, self.loss_sum, self.prediction_sum, auc)

    def scores_and_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Return copies of the kept scores and labels, in update order.

        Both arrays are empty when the metrics were built with ``keep_scores=False``.
        """
        return np.array(self._scores, dtype=np.float64), np.array(self._labels, dtype=np.int8)


def pool_binary_metrics(parts: Iterable[BinaryMetrics]) -> BinaryMetrics:
    """Combine the metrics of disjoint sets of examples into the metrics of their union.

    Counts and sums add up, so the pooled log loss, normalised entropy and
    calibration are those of all the examples together, not averages of the
    parts' ratios. The pooled AUC is exact when every part kept its scores;
    otherwise the pooled metrics keep no scores and report no AUC.
    """
    parts = list(parts)
    pooled = BinaryMetrics(keep_scores=all(part.keep_scores for part in parts))
    for part in parts:
        pooled.count += part.count
        pooled.positives += part.positives
        pooled.loss_sum += part.loss_sum
        pooled.prediction_sum += part.prediction_sum
        if pooled.keep_scores:
            pooled._scores.extend(part._scores)
            pooled._labels.extend(part._labels)
    return pooled


class RollingBinaryMetrics:
    """The same metrics over the last ``window`` examples, kept in a ring buffer."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"rolling window must be at least 1 example, got {window}")
        self.window = window
        self._scores = np.zeros(window)
        self._labels = np.zeros(window, dtype=np.int8)
        self._losses = np.zeros(window)
        self._next = 0
        self._count = 0

    def update(self, probability: float, label: int, loss: float | None = None) -> None:
        """Add one prediction and its label, replacing the oldest beyond the window."""
        if loss is None:
            loss = log_loss_one(probability, label)
        index = self._next
        self._scores[index] = probability
        self._labels[index] = label
        self._losses[index] = loss
        self._next = (index + 1) % self.window
        if self._count < self.window:
            self._count += 1

    def report(self) -> BinaryReport:
        """Return the metrics over the window."""
        count = self._count
        if count == 0:
            return _report(0, 0, 0.0, 0.0, None)
        scores, labels = self._scores[:count], self._labels[:count]
        auc = roc_auc(scores, labels)
        return _report(
            count, int(labels.sum()), float(self._losses[:count].sum()), float(scores.sum()), auc
        )
