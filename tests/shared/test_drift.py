"""Reference profiles, live binning and the population stability index."""

from __future__ import annotations

import math
import random

import pytest
from pydantic import ValidationError

from shared.drift import (
    SCORE_EDGES,
    CategoricalProfile,
    FeatureProfileBuilder,
    NumericProfile,
    ReferenceProfile,
    bin_counts,
    feature_psi,
    population_stability_index,
    shares_from_counts,
    unseen_category_share,
)


def uniform_profile(seed: int = 1, count: int = 20_000, **settings) -> ReferenceProfile:
    rng = random.Random(seed)
    builder = FeatureProfileBuilder(**settings)
    for _ in range(count):
        builder.update({"price": rng.uniform(0.0, 100.0)}, 0.01)
    return builder.build()


# PSI


def test_psi_identical_is_zero():
    shares = [0.1, 0.2, 0.3, 0.4]

    assert population_stability_index(shares, shares) == 0.0


def test_psi_known_shift():
    expected = 0.4 * math.log(1.8) + (-0.4) * math.log(0.2)

    psi = population_stability_index([0.5, 0.5], [0.9, 0.1])

    assert psi == pytest.approx(expected, rel=1e-12)
    assert psi == pytest.approx(0.8789, abs=1e-4)


def test_psi_floors_empty_bin_at_epsilon():
    psi = population_stability_index([0.5, 0.5], [1.0, 0.0], epsilon=1e-4)

    expected = (1.0 - 0.5) * math.log(1.0 / 0.5) + (1e-4 - 0.5) * math.log(1e-4 / 0.5)
    assert psi == pytest.approx(expected)
    assert math.isfinite(psi)


def test_psi_is_symmetric_and_positive():
    forward = population_stability_index([0.2, 0.8], [0.6, 0.4])
    backward = population_stability_index([0.6, 0.4], [0.2, 0.8])

    assert forward == pytest.approx(backward)
    assert forward > 0.0


@pytest.mark.parametrize(
    ("expected", "actual", "message"),
    [
        ([0.5, 0.5], [1.0], "same bins"),
        ([], [], "at least one bin"),
        ([0.5, 0.5], [1.5, -0.5], "not negative"),
        ([0.5, 0.5], [float("nan"), 0.5], "finite"),
        ([10, 10], [12, 8], "add up to 1"),
    ],
)
def test_psi_rejects_invalid_shares(expected, actual, message):
    with pytest.raises(ValueError, match=message):
        population_stability_index(expected, actual)


def test_shares_from_counts():
    assert shares_from_counts([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError, match="no values"):
        shares_from_counts([0, 0])


# Categorical features


def test_categorical_top_values_and_other():
    builder = FeatureProfileBuilder(max_categories=2)
    for value, repeats in [("a", 50), ("b", 30), ("c", 15), ("d", 5)]:
        for _ in range(repeats):
            builder.update({"campaign": value}, 0.01)

    profile = builder.build().features["campaign"]

    assert isinstance(profile, CategoricalProfile)
    assert profile.categories == ["a", "b"]
    assert profile.shares == pytest.approx([0.5, 0.3, 0.2])
    assert profile.count == 100


def test_unseen_categories_go_to_other():
    profile = CategoricalProfile(categories=["a", "b"], shares=[0.6, 0.3, 0.1], count=10)

    counts = bin_counts(profile, ["a", "b", "new-1", "new-2", "a"])

    assert counts == [2, 1, 2]
    assert unseen_category_share(profile, ["a", "b", "new-1", "new-2", "a"]) == pytest.approx(0.4)
    assert unseen_category_share(profile, []) is None


def test_categorical_keeps_bool_apart_from_text_and_numbers():
    profile = CategoricalProfile(categories=[True, "True"], shares=[0.5, 0.5, 0.0], count=2)

    assert bin_counts(profile, [True, "True", 1, False, None]) == [1, 1, 3]


def test_categorical_bounded_counter_finds_frequent_values():
    rng = random.Random(3)
    builder = FeatureProfileBuilder(max_categories=3, category_capacity=50)
    for _ in range(20_000):
        if rng.random() < 0.5:
            value = rng.choice(["hot-1", "hot-2", "hot-3"])
        else:
            value = f"tail-{rng.randrange(10_000)}"
        builder.update({"item_id": value}, 0.01)

    profile = builder.build().features["item_id"]

    assert sorted(profile.categories) == ["hot-1", "hot-2", "hot-3"]
    # Misra-Gries counts run low by at most total / (capacity + 1) each.
    low_by_at_most = 1 / 51
    for share in profile.shares[:3]:
        assert 1 / 6 - low_by_at_most - 0.02 <= share <= 1 / 6 + 0.02
    assert sum(profile.shares) == pytest.approx(1.0)


# Numeric features


def test_numeric_bins_from_uniform_are_equal_mass():
    profile = uniform_profile().features["price"]

    assert isinstance(profile, NumericProfile)
    assert len(profile.shares) == 10
    for share in profile.shares:
        assert share == pytest.approx(0.1, abs=0.02)


def test_numeric_live_uniform_fills_bins_evenly():
    profile = uniform_profile().features["price"]
    rng = random.Random(99)

    counts = bin_counts(profile, [rng.uniform(0.0, 100.0) for _ in range(10_000)])

    for count in counts:
        assert count == pytest.approx(1_000, abs=150)
    assert feature_psi(profile, [rng.uniform(0.0, 100.0) for _ in range(10_000)]) < 0.02


def test_numeric_shift_raises_psi():
    profile = uniform_profile().features["price"]
    rng = random.Random(5)

    psi = feature_psi(profile, [rng.uniform(50.0, 150.0) for _ in range(5_000)])

    assert psi > 0.25


def test_numeric_bin_edges_are_right_closed():
    profile = NumericProfile(edges=[1.0, 2.0], shares=[0.2, 0.5, 0.3], count=10)

    assert bin_counts(profile, [0.5, 1.0, 1.5, 2.0, 2.5]) == [2, 2, 1]


def test_numeric_skips_wrong_kinds():
    profile = NumericProfile(edges=[1.0], shares=[0.5, 0.5], count=2)

    assert bin_counts(profile, [0.5, 3, True, "3", float("nan"), None]) == [1, 1]


def test_numeric_few_distinct_values_merge_edges():
    builder = FeatureProfileBuilder()
    for position in [0, 1, 2] * 1000:
        builder.update({"position": position}, 0.01)

    profile = builder.build().features["position"]
    bins = [profile.bin_index(position) for position in (0, 1, 2)]

    assert len(profile.edges) < 9
    assert len(set(bins)) == 3
    for index in bins:
        assert profile.shares[index] == pytest.approx(1 / 3, abs=0.03)


def test_profile_is_deterministic_for_seed():
    profiles = [uniform_profile(seed=4, count=10_000, reservoir_size=500) for _ in range(2)]

    assert profiles[0] == profiles[1]


# Score histogram and presence


def test_score_histogram_log_spaced():
    builder = FeatureProfileBuilder()
    for score in [0.0, 5e-5, 1e-4, 0.001, 0.01, 0.5, 1.0]:
        builder.update({}, score)

    score = builder.build().score

    assert score.edges == list(SCORE_EDGES)
    assert len(score.shares) == 21
    assert score.edges[0] == pytest.approx(1e-4)
    assert score.edges[1] / score.edges[0] == pytest.approx(10**0.2)
    assert bin_counts(score, [0.0, 5e-5, 1e-4]) == [3] + [0] * 20
    assert bin_counts(score, [1.0])[-1] == 1


@pytest.mark.parametrize("score", [-0.1, 1.5, float("nan")])
def test_builder_rejects_invalid_score(score):
    with pytest.raises(ValueError, match="probability"):
        FeatureProfileBuilder().update({}, score)


def test_presence_rates():
    builder = FeatureProfileBuilder()
    builder.update({"a": "x", "b": 1.0}, 0.01)
    builder.update({"a": "y"}, 0.01)
    builder.update({"a": "x"}, 0.01)
    builder.update({"a": "z", "b": 2.0}, 0.01)

    profile = builder.build()

    assert profile.presence == {"a": 1.0, "b": 0.5}
    assert set(profile.features) == {"a", "b"}


def test_max_features_bounds_tracked_names():
    builder = FeatureProfileBuilder(max_features=2)
    builder.update({"a": 1.0, "b": 2.0, "c": 3.0}, 0.01)
    builder.update({"c": 3.0, "d": 4.0}, 0.01)

    profile = builder.build()

    assert set(profile.features) == {"a", "b"}
    assert profile.untracked_values == 3


# Serialisation


def test_profile_json_round_trip():
    rng = random.Random(8)
    builder = FeatureProfileBuilder()
    for _ in range(2_000):
        features = {
            "campaign": rng.choice(["c1", "c2", "c3"]),
            "mobile": rng.random() < 0.3,
            "price": rng.lognormvariate(2.0, 1.0),
            "position": rng.randrange(5),
        }
        builder.update(features, min(1.0, rng.expovariate(50.0)))
    profile = builder.build()

    restored = ReferenceProfile.model_validate_json(profile.model_dump_json())

    assert restored == profile
    assert isinstance(restored.features["mobile"], CategoricalProfile)
    assert all(isinstance(value, bool) for value in restored.features["mobile"].categories)
    assert bin_counts(restored.features["campaign"], ["c1", "zz"]) == bin_counts(
        profile.features["campaign"], ["c1", "zz"]
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "numeric", "edges": [2.0, 1.0], "shares": [0.3, 0.3, 0.4], "count": 3},
        {"kind": "numeric", "edges": [1.0], "shares": [1.0], "count": 3},
        {"kind": "numeric", "edges": [1.0], "shares": [3.0, 7.0], "count": 10},
        {"kind": "categorical", "categories": ["a", "a"], "shares": [0.5, 0.5, 0.0], "count": 2},
        {"kind": "categorical", "categories": ["a"], "shares": [1.0], "count": 2},
    ],
    ids=["unsorted-edges", "share-count", "counts-not-shares", "duplicate-category", "no-other"],
)
def test_invalid_feature_profile_rejected(fields):
    with pytest.raises(ValidationError):
        ReferenceProfile.model_validate(
            {
                "examples": 3,
                "presence": {"f": 1.0},
                "features": {"f": fields},
                "score": {"edges": [], "shares": [1.0], "count": 3},
            }
        )
