"""Paired bootstrap: weighted metrics, resampling, known-truth coverage and edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared.metrics.binary import BinaryMetrics, roc_auc
from shared.metrics.bootstrap import (
    bootstrap_weights,
    compare_paired,
    paired_bootstrap,
    percentile_interval,
    weighted_auc,
    weighted_calibration,
    weighted_calibration_error,
    weighted_log_loss,
    weighted_normalized_entropy,
)

# True click probabilities of the coverage simulation, drawn uniformly.
TRUE_PROBABILITIES = np.array([0.02, 0.05, 0.1, 0.2, 0.4])
# The challenger shifts each true probability by this much on the logit scale.
LOGIT_SHIFT = 0.3


def random_scores(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw scores rounded to two decimals, so that ties occur, and labels that follow them."""
    rng = np.random.default_rng(seed)
    scores = np.round(rng.beta(1, 8, size=count), 2)
    labels = (rng.random(count) < scores).astype(np.int8)
    return scores, labels


def test_weighted_metrics_with_unit_weights_match_binary_metrics() -> None:
    scores, labels = random_scores(2_000, seed=1)
    metrics = BinaryMetrics()
    for score, label in zip(scores, labels, strict=True):
        metrics.update(float(score), int(label))
    report = metrics.report()
    ones = np.ones((1, scores.size))

    assert weighted_log_loss(ones, scores, labels)[0] == pytest.approx(report.log_loss)
    assert weighted_normalized_entropy(ones, scores, labels)[0] == pytest.approx(
        report.normalized_entropy
    )
    assert weighted_auc(ones, scores, labels)[0] == pytest.approx(report.auc)
    assert weighted_calibration(ones, scores, labels)[0] == pytest.approx(report.calibration)
    assert weighted_calibration_error(ones, scores, labels)[0] == pytest.approx(
        abs(report.calibration - 1.0)
    )


def test_weighted_auc_matches_auc_of_resample() -> None:
    scores, labels = random_scores(500, seed=2)
    weights = next(bootstrap_weights(scores.size, samples=5, seed=3))

    aucs = weighted_auc(weights, scores, labels)

    for row, auc in zip(weights, aucs, strict=True):
        drawn = np.repeat(np.arange(scores.size), row.astype(int))
        assert auc == pytest.approx(roc_auc(scores[drawn], labels[drawn]))


def test_weighted_metrics_undefined_without_clicks() -> None:
    scores = np.array([0.1, 0.2, 0.3])
    labels = np.zeros(3, dtype=np.int8)
    ones = np.ones((1, 3))

    assert np.isnan(weighted_auc(ones, scores, labels)[0])
    assert np.isnan(weighted_normalized_entropy(ones, scores, labels)[0])
    assert np.isnan(weighted_calibration(ones, scores, labels)[0])


def test_bootstrap_weights_rows_count_every_draw() -> None:
    blocks = list(bootstrap_weights(count=1_000, samples=50, seed=7))
    weights = np.concatenate(blocks)

    assert weights.shape == (50, 1_000)
    assert np.all(weights.sum(axis=1) == 1_000)
    assert np.all(weights >= 0)


def test_bootstrap_weights_split_into_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shared.metrics.bootstrap.MAX_BLOCK_CELLS", 3_000)

    blocks = list(bootstrap_weights(count=1_000, samples=10, seed=7))

    assert [block.shape[0] for block in blocks] == [3, 3, 3, 1]


def test_bootstrap_weights_repeat_with_seed() -> None:
    first = np.concatenate(list(bootstrap_weights(300, 20, seed=5)))
    again = np.concatenate(list(bootstrap_weights(300, 20, seed=5)))
    other = np.concatenate(list(bootstrap_weights(300, 20, seed=6)))

    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_bootstrap_weights_reject_empty_sample() -> None:
    with pytest.raises(ValueError, match="at least 1 example"):
        next(bootstrap_weights(0, 10, seed=0))


def test_model_against_itself_has_zero_width_interval() -> None:
    scores, labels = random_scores(1_000, seed=4)

    values, differences = compare_paired(
        {"main": scores, "same": scores.copy()}, labels, samples=200, seed=1
    )

    for metric, interval in differences["same"].items():
        assert interval.estimate == 0.0, metric
        assert interval.low == 0.0, metric
        assert interval.high == 0.0, metric
        assert not interval.significant, metric
    assert values["main"] == values["same"]


def test_clearly_worse_model_is_significant() -> None:
    scores, labels = random_scores(5_000, seed=8)
    noisy = np.clip(scores + np.random.default_rng(9).normal(0, 0.2, scores.size), 0.001, 0.999)

    _, differences = compare_paired({"main": scores, "noisy": noisy}, labels, samples=300)

    log_loss = differences["noisy"]["log_loss"]
    auc = differences["noisy"]["auc"]
    assert log_loss.significant
    assert log_loss.low > 0
    assert auc.significant
    assert auc.high < 0


def test_scores_of_wrong_length_are_rejected() -> None:
    scores, labels = random_scores(100, seed=1)

    with pytest.raises(ValueError, match="'short' has 99 scores for 100 labels"):
        compare_paired({"main": scores, "short": scores[:-1]}, labels, samples=100)


def test_percentile_interval_needs_half_the_replicates() -> None:
    mostly_undefined = np.array([np.nan] * 6 + [1.0, 2.0, 3.0, 4.0])
    enough = np.array([np.nan] * 4 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])

    assert percentile_interval(mostly_undefined, 0.9) is None
    assert percentile_interval(enough, 0.5) == pytest.approx((2.25, 4.75))


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1.0 - p))


def _challenger(p: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(_logit(p) + LOGIT_SHIFT)))


def _true_log_loss_difference() -> float:
    """Return E[loss(challenger) - loss(truth)], the mean KL divergence over the probabilities."""
    p = TRUE_PROBABILITIES
    q = _challenger(p)
    kl = p * np.log(p / q) + (1.0 - p) * np.log((1.0 - p) / (1.0 - q))
    return float(kl.mean())


def test_intervals_cover_true_difference_at_nominal_rate() -> None:
    # Each dataset draws 1,000 examples. The reference predicts the true
    # probability and the challenger a shifted one, so the expected log-loss
    # difference is the mean KL divergence, known exactly.
    datasets, examples, level = 200, 1_000, 0.9
    truth = _true_log_loss_difference()
    rng = np.random.default_rng(2024)

    covered = 0
    for dataset in range(datasets):
        p = rng.choice(TRUE_PROBABILITIES, size=examples)
        labels = (rng.random(examples) < p).astype(np.int8)
        interval = paired_bootstrap(
            weighted_log_loss,
            p,
            _challenger(p),
            labels,
            confidence_level=level,
            samples=400,
            seed=dataset,
        )
        covered += interval.low <= truth <= interval.high

    coverage = covered / datasets
    # Three binomial standard errors of a coverage estimate from 200 datasets.
    tolerance = 3 * math.sqrt(level * (1 - level) / datasets)
    assert abs(coverage - level) <= tolerance, f"coverage {coverage:.3f}, truth {truth:.5f}"
