"""A synthetic population of users and items whose click probabilities are known.

The true click probability of user ``u`` shown item ``i`` is a logistic model::

    logit(p) = logit(base click rate) + item effect + category effect
               + price effect * standardised log price + user segment effect

Items are drawn by Zipf popularity and users uniformly. After the drift the
population behaves differently in up to four ways, each set in
:class:`~services.simulator.settings.SimulatorSettings`: another base rate,
negated effects, popularity ranks given to other items (so the category and
price mix moves), and a share of new items in categories the model has never
seen. A share of impressions after the drift also lacks the price feature.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math

import numpy as np

from services.simulator.settings import SimulatorSettings
from shared.events import Impression

# Log prices are drawn from Normal(mean, sd); the price effect is per SD.
LOG_PRICE_MEAN = math.log(30.0)
LOG_PRICE_SD = 0.8
# Items of unseen categories that the drift introduces.
NEW_ITEMS = 50
NEW_CATEGORIES = 5


def _logit(probability: float) -> float:
    return math.log(probability / (1.0 - probability))


def _sigmoid(logit: float) -> float:
    return 1.0 / (1.0 + math.exp(-logit))


@dataclasses.dataclass(frozen=True, slots=True)
class SimulatedImpression:
    """One impression to score, with the truth the model has to learn."""

    impression: Impression
    true_probability: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Catalogue:
    """Item attributes and model effects, one array entry per item, category or segment."""

    item_categories: np.ndarray
    item_prices: np.ndarray
    item_effects: np.ndarray
    category_effects: np.ndarray
    popularity: np.ndarray


class Population:
    """Users and items with known click probabilities, before and after the drift.

    All randomness comes from one generator seeded with ``simulator_seed``,
    so two populations with the same settings draw the same sequence.
    """

    def __init__(self, settings: SimulatorSettings, run_id: str) -> None:
        self.settings = settings
        self.run_id = run_id
        self.rng = np.random.default_rng(settings.simulator_seed)
        self.drawn = 0

        self.user_segments = self.rng.integers(
            0, settings.population_user_segments, size=settings.population_users
        )
        self.segment_effects = self.rng.normal(
            0.0, settings.population_segment_effect_sd, size=settings.population_user_segments
        )
        self.before = self._draw_catalogue(
            settings.population_items, settings.population_categories
        )
        self.after = self._drifted_catalogue(self.before)
        # Items of never-seen categories, numbered after the regular ones.
        self.new_items = self._draw_catalogue(NEW_ITEMS, NEW_CATEGORIES)

    def _draw_catalogue(self, items: int, categories: int) -> _Catalogue:
        settings = self.settings
        ranks = np.arange(1, items + 1, dtype=float)
        popularity = ranks**-settings.population_item_popularity_exponent
        return _Catalogue(
            item_categories=self.rng.integers(0, categories, size=items),
            item_prices=np.round(
                np.exp(self.rng.normal(LOG_PRICE_MEAN, LOG_PRICE_SD, size=items)), 2
            ),
            item_effects=self.rng.normal(0.0, settings.population_item_effect_sd, size=items),
            category_effects=self.rng.normal(
                0.0, settings.population_category_effect_sd, size=categories
            ),
            popularity=popularity / popularity.sum(),
        )

    def _drifted_catalogue(self, before: _Catalogue) -> _Catalogue:
        settings = self.settings
        flipped = set(settings.population_drift_effects)
        popularity = before.popularity
        if settings.population_drift_reshuffle_popularity:
            popularity = popularity[self.rng.permutation(len(popularity))]
        return dataclasses.replace(
            before,
            item_effects=-before.item_effects if "item" in flipped else before.item_effects,
            category_effects=(
                -before.category_effects if "category" in flipped else before.category_effects
            ),
            popularity=popularity,
        )

    def draw(self, event_time: dt.datetime, drifted: bool) -> SimulatedImpression:
        """Draw the next impression shown at ``event_time`` and its true click probability."""
        settings = self.settings
        index = self.drawn
        self.drawn += 1

        user = int(self.rng.integers(0, settings.population_users))
        segment = int(self.user_segments[user])
        is_new_item = drifted and self.rng.random() < settings.population_drift_new_item_share
        if is_new_item:
            catalogue = self.new_items
            item = int(self.rng.choice(NEW_ITEMS, p=catalogue.popularity))
            item_id = f"n{item}"
            category_name = f"new{int(catalogue.item_categories[item])}"
        else:
            catalogue = self.after if drifted else self.before
            item = int(self.rng.choice(settings.population_items, p=catalogue.popularity))
            item_id = f"i{item}"
            category_name = f"c{int(catalogue.item_categories[item])}"
        category = int(catalogue.item_categories[item])
        price = float(catalogue.item_prices[item])

        flips = set(settings.population_drift_effects) if drifted else set()
        standardised_price = (math.log(price) - LOG_PRICE_MEAN) / LOG_PRICE_SD
        price_effect = settings.population_price_effect * standardised_price
        segment_effect = float(self.segment_effects[segment])
        base_rate = settings.population_base_click_rate
        if drifted:
            base_rate = settings.population_drift_base_click_rate or base_rate
            price_effect = -price_effect if "price" in flips else price_effect
            segment_effect = -segment_effect if "segment" in flips else segment_effect
        logit = (
            _logit(base_rate)
            + float(catalogue.item_effects[item])
            + float(catalogue.category_effects[category])
            + price_effect
            + segment_effect
        )

        features: dict[str, str | float] = {
            "category": category_name,
            "price": price,
            "user_segment": f"s{segment}",
        }
        if drifted and self.rng.random() < settings.population_drift_missing_price_share:
            del features["price"]

        impression = Impression(
            impression_id=f"sim-{self.run_id}-{index}",
            event_time=event_time,
            user_id=f"u{user}",
            item_id=item_id,
            features=features,
        )
        return SimulatedImpression(impression, _sigmoid(logit))

    def draw_click_delay(self, probability: float) -> float | None:
        """Decide whether the user clicks, and return the delay in seconds, or None for no click.

        The click happens with the true probability. Its delay is log-normal
        around ``click_delay_median_seconds``, capped at ``click_delay_max_seconds``.
        """
        settings = self.settings
        if self.rng.random() >= probability:
            return None
        delay = self.rng.lognormal(
            math.log(settings.click_delay_median_seconds), settings.click_delay_sigma
        )
        return float(min(delay, settings.click_delay_max_seconds))
