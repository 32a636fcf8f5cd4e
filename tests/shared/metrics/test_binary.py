import math

import numpy as np
import pytest
from river import metrics as river_metrics

from shared.metrics.binary import (
    BinaryMetrics,
    RollingBinaryMetrics,
    binary_entropy,
    log_loss_one,
    pool_binary_metrics,
    roc_auc,
)


def test_auc_at_click_rate_probabilities() -> None:
    scores = [0.01, 0.02, 0.05, 0.08]
    labels = [0, 0, 1, 1]
    river_auc = river_metrics.ROCAUC()
    for score, label in zip(scores, labels, strict=True):
        river_auc.update(bool(label), {True: score, False: 1 - score})

    assert roc_auc(np.array(scores), np.array(labels)) == pytest.approx(1.0)
    # The fixed-threshold approximation this module exists to avoid.
    assert river_auc.get() == pytest.approx(0.5, abs=0.01)


def test_auc_hand_computed_with_ties() -> None:
    # Pairs (positive, negative): (0.4, 0.1) right, (0.4, 0.4) tie, (0.4, 0.6) wrong,
    # (0.7, 0.1) right, (0.7, 0.4) right, (0.7, 0.6) right -> (4 + 0.5) / 6.
    scores = np.array([0.1, 0.4, 0.6, 0.4, 0.7])
    labels = np.array([0, 0, 0, 1, 1])

    assert roc_auc(scores, labels) == pytest.approx(4.5 / 6)


def test_auc_matches_pairwise_count_on_random_data() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(400), 2)
    labels = rng.random(400) < 0.2
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()

    assert roc_auc(scores, labels) == pytest.approx(pairs / (len(pos) * len(neg)))


def test_auc_undefined_with_one_class() -> None:
    assert roc_auc(np.array([0.1, 0.2]), np.array([0, 0])) is None


def test_log_loss_matches_river() -> None:
    river_loss = river_metrics.LogLoss()
    ours = BinaryMetrics()
    for probability, label in [(0.9, 1), (0.1, 0), (0.2, 0), (0.65, 1), (0.0, 1), (1.0, 1)]:
        river_loss.update(bool(label), probability)
        ours.update(probability, label)

    assert ours.report().log_loss == pytest.approx(river_loss.get(), abs=1e-12)


def test_normalized_entropy_of_constant_rate_is_one() -> None:
    metrics = BinaryMetrics()
    labels = [1] * 10 + [0] * 90
    for label in labels:
        metrics.update(0.1, label)

    report = metrics.report()

    assert report.normalized_entropy == pytest.approx(1.0)
    assert report.calibration == pytest.approx(1.0)
    assert report.click_rate == pytest.approx(0.1)


def test_binary_entropy_known_value() -> None:
    assert binary_entropy(0.5) == pytest.approx(math.log(2))
    assert binary_entropy(0.0) == 0.0
    assert log_loss_one(0.5, 1) == pytest.approx(math.log(2))


def test_rolling_window_forgets_old_examples() -> None:
    rolling = RollingBinaryMetrics(window=3)
    for probability, label in [(0.9, 0), (0.9, 0), (0.1, 0), (0.1, 0), (0.8, 1)]:
        rolling.update(probability, label)

    report = rolling.report()

    assert report.count == 3
    assert report.positives == 1
    assert report.auc == pytest.approx(1.0)
    assert report.log_loss == pytest.approx((2 * -math.log(0.9) + -math.log(0.8)) / 3)


def test_empty_report_has_no_values() -> None:
    report = BinaryMetrics().report()

    assert report.count == 0
    assert report.log_loss is None
    assert report.auc is None


def test_pooled_metrics_equal_union() -> None:
    rng = np.random.default_rng(5)
    scores = rng.uniform(0.01, 0.4, 300)
    labels = (rng.uniform(size=scores.size) < scores).astype(int)
    union = BinaryMetrics()
    parts = [BinaryMetrics() for _ in range(3)]
    # The parts differ in size, so an average of their ratios differs from the pooled value.
    part_of = np.digitize(np.arange(scores.size), [20, 60])
    for score, label, part in zip(scores, labels, part_of, strict=True):
        union.update(float(score), int(label))
        parts[part].update(float(score), int(label))

    pooled = pool_binary_metrics(parts).report()

    expected = union.report()
    assert pooled.count == expected.count == 300
    assert pooled.positives == expected.positives
    assert pooled.log_loss == pytest.approx(expected.log_loss)
    assert pooled.normalized_entropy == pytest.approx(expected.normalized_entropy)
    assert pooled.calibration == pytest.approx(expected.calibration)
    assert pooled.auc == pytest.approx(expected.auc)
    mean_of_ratios = np.mean([part.report().normalized_entropy for part in parts])
    assert pooled.normalized_entropy != pytest.approx(mean_of_ratios)


def test_pooled_metrics_without_kept_scores() -> None:
    with_scores, without_scores = BinaryMetrics(), BinaryMetrics(keep_scores=False)
    with_scores.update(0.2, 1)
    without_scores.update(0.1, 0)

    pooled = pool_binary_metrics([with_scores, without_scores]).report()

    assert pooled.count == 2
    assert pooled.positives == 1
    assert pooled.auc is None
    assert pooled.calibration == pytest.approx(0.3)


def test_pooled_metrics_of_nothing_are_empty() -> None:
    report = pool_binary_metrics([]).report()

    assert report.count == 0
    assert report.normalized_entropy is None
