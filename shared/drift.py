"""Reference profiles of training traffic and the population stability index (PSI).

The trainer feeds every example it learns, with the score it served, to a
:class:`FeatureProfileBuilder` and stores the built :class:`ReferenceProfile`
in each model snapshot. The scorer puts live values into the same bins with
:func:`bin_counts` and compares the shares with
:func:`population_stability_index`.

Each profiled distribution is a list of bins with their expected shares:

- a categorical feature (``str`` or ``bool`` values) has one bin per listed
  category, the most frequent first, and a last ``(other)`` bin for every
  other value;
- a numeric feature (``int`` or ``float`` values) has bins cut at quantiles
  of a seeded reservoir sample of its values;
- the served score has fixed, log-spaced bins suited to click rates.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, model_validator

PROFILE_SCHEMA_VERSION = 1
OTHER_BUCKET = "(other)"

# Score bins: one bin for scores up to 1e-4, then 20 bins whose edges are
# evenly spaced in log10 between 1e-4 and 1, that is five bins per decade.
SCORE_EDGES: tuple[float, ...] = tuple(float(edge) for edge in np.logspace(-4.0, 0.0, 21)[:-1])

# Shares must add up to 1 within this tolerance, which is loose enough for
# shares computed by division and tight enough to catch raw counts.
_SHARE_SUM_TOLERANCE = 1e-6


class _ProfileModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


def _check_shares(shares: Sequence[float], count: int) -> None:
    if any(share < 0.0 for share in shares):
        raise ValueError("bin shares must not be negative")
    total = sum(shares)
    if count > 0 and abs(total - 1.0) > _SHARE_SUM_TOLERANCE:
        raise ValueError(f"bin shares must add up to 1, got {total!r}")
    if count == 0 and total != 0.0:
        raise ValueError("a profile of no values must have all shares 0")


class NumericProfile(_ProfileModel):
    """The binned distribution of a numeric feature or of the served score.

    ``edges`` are the cut points, strictly increasing. Bin ``i`` contains the
    values ``v`` with ``edges[i - 1] < v <= edges[i]``. The first bin contains
    every value up to ``edges[0]`` and the last bin every value above
    ``edges[-1]``, so there is one more share than edges.
    """

    kind: Literal["numeric"] = "numeric"
    edges: list[float]
    shares: list[float]
    count: int = Field(ge=0, description="Number of values the shares were computed from.")

    @model_validator(mode="after")
    def _check(self) -> NumericProfile:
        if len(self.shares) != len(self.edges) + 1:
            raise ValueError(
                f"a numeric profile with {len(self.edges)} edges needs "
                f"{len(self.edges) + 1} shares, got {len(self.shares)}"
            )
        if any(low >= high for low, high in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError("numeric bin edges must be strictly increasing")
        _check_shares(self.shares, self.count)
        return self

    def bin_index(self, value: float) -> int:
        """Return the index of the bin that contains a value."""
        return bisect.bisect_left(self.edges, value)


class CategoricalProfile(_ProfileModel):
    """The distribution of a categorical feature over its most frequent values.

    ``shares`` has one entry per category, in the same order, and a last entry
    for the ``(other)`` bin, which contains every value not listed.
    """

    kind: Literal["categorical"] = "categorical"
    categories: list[Annotated[StrictBool | str, Field(union_mode="left_to_right")]]
    shares: list[float]
    count: int = Field(ge=0, description="Number of values the shares were computed from.")

    _index: dict[tuple[str, Any], int] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> CategoricalProfile:
        if len(self.shares) != len(self.categories) + 1:
            raise ValueError(
                f"a categorical profile with {len(self.categories)} categories needs "
                f"{len(self.categories) + 1} shares, the last for {OTHER_BUCKET}, "
                f"got {len(self.shares)}"
            )
        self._index = {_category_key(value): i for i, value in enumerate(self.categories)}
        if len(self._index) != len(self.categories):
            raise ValueError("categories must be unique")
        _check_shares(self.shares, self.count)
        return self

    def bin_index(self, value: Any) -> int:
        """Return the index of the category's bin, or of ``(other)`` for an unlisted value."""
        key = _category_key(value)
        if key is None:
            return len(self.categories)
        return self._index.get(key, len(self.categories))

    def is_listed(self, value: Any) -> bool:
        """Return whether the value is one of the profile's categories."""
        key = _category_key(value)
        return key is not None and key in self._index


FeatureProfile = Annotated[NumericProfile | CategoricalProfile, Field(discriminator="kind")]


class ReferenceProfile(_ProfileModel):
    """The traffic a model snapshot was trained on, for drift checks against live traffic.

    ``presence`` maps each expected feature name to the share of examples that
    had it, and ``features`` maps the same names to their distributions.
    """

    schema_version: Literal[1] = PROFILE_SCHEMA_VERSION
    examples: int = Field(ge=0)
    presence: dict[str, float]
    features: dict[str, FeatureProfile]
    score: NumericProfile
    untracked_values: int = Field(
        default=0,
        ge=0,
        description="Feature values left out because max_features names were already tracked.",
    )

    @model_validator(mode="after")
    def _check(self) -> ReferenceProfile:
        if set(self.presence) != set(self.features):
            raise ValueError("presence and features must name the same features")
        if any(not 0.0 <= rate <= 1.0 for rate in self.presence.values()):
            raise ValueError("presence rates must be between 0 and 1")
        return self


def _category_key(value: Any) -> tuple[str, Any] | None:
    """Return a lookup key that keeps ``True`` apart from ``1`` and ``"True"``, or None."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, str):
        return ("str", value)
    return None


def _is_numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class _MisraGriesCounter:
    """Approximate counts of the most frequent values, in at most ``capacity`` counters.

    Misra-Gries summary: when a new value finds no free counter, every counter
    drops by one. Each count is low by at most ``total / (capacity + 1)``.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.total = 0
        self.counts: dict[Any, int] = {}

    def update(self, value: Any) -> None:
        self.total += 1
        if value in self.counts:
            self.counts[value] += 1
        elif len(self.counts) < self.capacity:
            self.counts[value] = 1
        else:
            # The new value and every stored one lose one count together. Each
            # such step removes capacity + 1 counts, so it runs at most
            # total / (capacity + 1) times.
            self.counts = {key: count - 1 for key, count in self.counts.items() if count > 1}

    def most_common(self, limit: int) -> list[tuple[Any, int]]:
        ranked = sorted(self.counts.items(), key=lambda item: item[1], reverse=True)
        return ranked[:limit]


class _Reservoir:
    """A uniform sample of at most ``size`` values from a stream (Vitter's algorithm R)."""

    def __init__(self, size: int, seed: str) -> None:
        self.size = size
        self.seen = 0
        self.values: list[float] = []
        self._rng = random.Random(seed)

    def update(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.size:
            self.values[slot] = value


class _FeatureTracker:
    """The builder's counts and sample of one feature name."""

    def __init__(self, name: str, settings: FeatureProfileBuilder) -> None:
        self.present = 0
        self.categories = _MisraGriesCounter(settings.category_capacity)
        self.numbers = _Reservoir(settings.reservoir_size, seed=f"{settings.seed}:{name}")


class FeatureProfileBuilder:
    """Build a :class:`ReferenceProfile` from a stream of (features, served score) pairs.

    Memory is bounded: each numeric feature keeps a reservoir of
    ``reservoir_size`` values and each categorical feature at most
    ``category_capacity`` counters, for at most ``max_features`` names.
    The same ``seed`` and stream give the same profile.
    """

    def __init__(
        self,
        max_categories: int = 50,
        numeric_bins: int = 10,
        reservoir_size: int = 2_000,
        category_capacity: int = 4_000,
        max_features: int = 256,
        seed: int = 0,
    ) -> None:
        if max_categories < 1:
            raise ValueError(f"max_categories must be at least 1, got {max_categories}")
        if numeric_bins < 2:
            raise ValueError(f"numeric_bins must be at least 2, got {numeric_bins}")
        if reservoir_size < numeric_bins:
            raise ValueError(
                f"reservoir_size ({reservoir_size}) must be at least numeric_bins ({numeric_bins})"
            )
        if category_capacity < max_categories:
            raise ValueError(
                f"category_capacity ({category_capacity}) must be at least "
                f"max_categories ({max_categories})"
            )
        if max_features < 1:
            raise ValueError(f"max_features must be at least 1, got {max_features}")
        self.max_categories = max_categories
        self.numeric_bins = numeric_bins
        self.reservoir_size = reservoir_size
        self.category_capacity = category_capacity
        self.max_features = max_features
        self.seed = seed

        self.examples = 0
        self.untracked_values = 0
        self._features: dict[str, _FeatureTracker] = {}
        self._score_counts = [0] * (len(SCORE_EDGES) + 1)

    def update(self, features: Mapping[str, Any], score: float) -> None:
        """Add one example's features and the click probability served for it.

        Strings and booleans count as categories, integers and floats as
        numbers. Non-finite numbers and values of other types count towards
        the feature's presence only.
        """
        if not 0.0 <= score <= 1.0:
            raise ValueError(f"score must be a probability between 0 and 1, got {score!r}")
        self.examples += 1
        self._score_counts[bisect.bisect_left(SCORE_EDGES, score)] += 1

        for name, value in features.items():
            tracker = self._tracker(name)
            if tracker is None:
                self.untracked_values += 1
                continue
            tracker.present += 1
            if isinstance(value, bool | str):
                tracker.categories.update(value)
            elif _is_numeric(value) and math.isfinite(value):
                tracker.numbers.update(float(value))

    def _tracker(self, name: str) -> _FeatureTracker | None:
        tracker = self._features.get(name)
        if tracker is None and len(self._features) < self.max_features:
            tracker = _FeatureTracker(name, self)
            self._features[name] = tracker
        return tracker

    def build(self) -> ReferenceProfile:
        """Return the profile of everything seen so far; the builder can go on updating."""
        presence: dict[str, float] = {}
        profiles: dict[str, NumericProfile | CategoricalProfile] = {}
        for name, tracker in sorted(self._features.items()):
            presence[name] = tracker.present / self.examples
            profiles[name] = self._build_feature(tracker)

        return ReferenceProfile(
            examples=self.examples,
            presence=presence,
            features=profiles,
            score=_profile_from_counts(list(SCORE_EDGES), self._score_counts),
            untracked_values=self.untracked_values,
        )

    def _build_feature(self, tracker: _FeatureTracker) -> NumericProfile | CategoricalProfile:
        # NOTE: a feature whose values mix categories and numbers is profiled
        # by its more frequent kind, and values of the other kind are left out.
        if tracker.categories.total >= tracker.numbers.seen and tracker.categories.total > 0:
            return self._build_categorical(tracker.categories)
        return self._build_numeric(tracker.numbers)

    def _build_categorical(self, counter: _MisraGriesCounter) -> CategoricalProfile:
        top = counter.most_common(self.max_categories)
        total = counter.total
        shares = [count / total for _, count in top]
        # The (other) share is what the listed categories leave. Misra-Gries
        # counts run low, so it can exceed the true share by at most
        # max_categories / (category_capacity + 1).
        other = max(0.0, 1.0 - sum(shares))
        return CategoricalProfile(
            categories=[value for value, _ in top],
            shares=_normalise([*shares, other]),
            count=total,
        )

    def _build_numeric(self, reservoir: _Reservoir) -> NumericProfile:
        if not reservoir.values:
            return NumericProfile(edges=[], shares=[0.0], count=0)
        sample = np.asarray(reservoir.values, dtype=float)
        levels = np.arange(1, self.numeric_bins) / self.numeric_bins
        # Tied quantiles, as in a feature with few distinct values, give one edge.
        edges = sorted({float(edge) for edge in np.quantile(sample, levels)})
        counts = [0] * (len(edges) + 1)
        for value in reservoir.values:
            counts[bisect.bisect_left(edges, value)] += 1
        # The shares come from the sample, so they are estimates for the
        # whole stream, but the count is the number of values seen.
        profile = _profile_from_counts(edges, counts)
        return profile.model_copy(update={"count": reservoir.seen})


def _normalise(shares: list[float]) -> list[float]:
    total = sum(shares)
    return [share / total for share in shares]


def _profile_from_counts(edges: list[float], counts: list[int]) -> NumericProfile:
    total = sum(counts)
    shares = [count / total for count in counts] if total else [0.0] * len(counts)
    return NumericProfile(edges=edges, shares=shares, count=total)


def bin_counts(profile: NumericProfile | CategoricalProfile, values: Iterable[Any]) -> list[int]:
    """Count live values in the reference profile's bins, in the order of its shares.

    A categorical profile counts every unlisted value, including values that
    are not strings or booleans, in its last ``(other)`` bin. A numeric
    profile skips booleans, strings, non-finite numbers and other types.
    """
    counts = [0] * len(profile.shares)
    if isinstance(profile, CategoricalProfile):
        for value in values:
            counts[profile.bin_index(value)] += 1
        return counts

    for value in values:
        if _is_numeric(value) and math.isfinite(value):
            counts[profile.bin_index(value)] += 1
    return counts


def unseen_category_share(profile: CategoricalProfile, values: Iterable[Any]) -> float | None:
    """Return the share of live values that are not among the profile's categories.

    :func:`bin_counts` also counts these values in the ``(other)`` bin, so
    this share separates new values from the reference's own long tail.
    Returns None when there are no values.
    """
    total = 0
    unseen = 0
    for value in values:
        total += 1
        if not profile.is_listed(value):
            unseen += 1
    return unseen / total if total else None


def shares_from_counts(counts: Sequence[int]) -> list[float]:
    """Return each bin's share of the total count; raise ValueError when the total is 0."""
    total = sum(counts)
    if total <= 0:
        raise ValueError("cannot compute bin shares of no values; collect live values first")
    return [count / total for count in counts]


def population_stability_index(
    expected: Sequence[float], actual: Sequence[float], epsilon: float = 1e-4
) -> float:
    """Compute the population stability index between two distributions over the same bins.

    PSI = sum over bins i of (a_i - e_i) * ln(a_i / e_i), where e_i and a_i
    are the expected and actual shares of bin i, each floored at ``epsilon``
    so that an empty bin gives a large but finite term. PSI is 0 for
    identical shares and never negative.

    Raises ValueError when the sequences differ in length, are empty, hold a
    negative or non-finite share, or do not add up to 1.
    """
    if len(expected) != len(actual):
        raise ValueError(
            f"expected and actual shares must cover the same bins, "
            f"got {len(expected)} and {len(actual)} bins"
        )
    if not expected:
        raise ValueError("PSI needs at least one bin")
    if not epsilon > 0.0:
        raise ValueError(f"epsilon must be positive, got {epsilon!r}")
    for label, shares in (("expected", expected), ("actual", actual)):
        if any(not math.isfinite(share) or share < 0.0 for share in shares):
            raise ValueError(f"{label} shares must be finite and not negative")
        total = math.fsum(shares)
        if abs(total - 1.0) > _SHARE_SUM_TOLERANCE:
            raise ValueError(
                f"{label} shares must add up to 1, got {total!r}; "
                "convert counts with shares_from_counts first"
            )

    psi = 0.0
    for expected_share, actual_share in zip(expected, actual, strict=True):
        e = max(expected_share, epsilon)
        a = max(actual_share, epsilon)
        psi += (a - e) * math.log(a / e)
    return psi


def feature_psi(
    profile: NumericProfile | CategoricalProfile, values: Iterable[Any]
) -> float | None:
    """Return the PSI of live values against a reference profile, or None without live values.

    Returns None too when the reference profile itself has no values.
    """
    counts = bin_counts(profile, values)
    if sum(counts) == 0 or profile.count == 0:
        return None
    return population_stability_index(profile.shares, shares_from_counts(counts))
