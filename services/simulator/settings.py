"""Settings of the traffic simulator (``ONLINE_CTR_*`` environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from shared.settings import ServiceSettings

DriftEffect = Literal["item", "category", "price", "segment"]


class SimulatorSettings(ServiceSettings):
    """Everything the simulator reads at start-up.

    The simulated population has known click probabilities: a logistic model
    of a base rate plus item, category, price and user-segment effects, drawn
    once from ``simulator_seed``. At ``population_drift_after_seconds`` the population
    changes its behaviour, so that drift detection and the model metrics have
    something to show.
    """

    metrics_port: int = Field(default=9104, ge=0, le=65535)

    scorer_url: str = Field(
        default="http://127.0.0.1:8000",
        description="Base URL of the scorer; each impression is a POST to <url>/v1/score.",
    )
    scorer_timeout_seconds: float = Field(default=2.0, gt=0)
    log_unscored_impressions: bool = Field(
        default=True,
        description=(
            "When the scorer is unavailable (5xx or no response), produce the impression to the "
            "impressions topic without a served score, so a fresh deployment can train its "
            "first model."
        ),
    )

    impressions_per_second: float = Field(
        default=20.0,
        gt=0,
        le=10_000,
        description=(
            "Mean rate of the Poisson arrivals. One keep-alive connection sends the requests "
            "one at a time, so the rate reached is at most one per scorer round trip."
        ),
    )
    run_seconds: float | None = Field(
        default=None, gt=0, description="Stop after this many seconds; unset runs until stopped."
    )
    simulator_seed: int = Field(default=0, ge=0)

    population_users: int = Field(default=2_000, ge=1)
    population_items: int = Field(default=300, ge=1)
    population_categories: int = Field(default=20, ge=1)
    population_user_segments: int = Field(default=4, ge=1)
    population_base_click_rate: float = Field(default=0.05, gt=0, lt=1)
    population_item_effect_sd: float = Field(default=0.6, ge=0)
    population_category_effect_sd: float = Field(default=0.4, ge=0)
    population_segment_effect_sd: float = Field(default=0.4, ge=0)
    population_price_effect: float = Field(
        default=-0.3, description="Logit change per SD of log price."
    )
    population_item_popularity_exponent: float = Field(
        default=1.0,
        ge=0,
        description="Zipf exponent of item popularity; 0 shows every item equally often.",
    )

    click_delay_median_seconds: float = Field(default=8.0, gt=0)
    click_delay_sigma: float = Field(
        default=1.0, gt=0, description="Standard deviation of the log of the click delay."
    )
    click_delay_max_seconds: float = Field(
        default=300.0,
        gt=0,
        description="Maximum click delay; keep it inside the joiner's attribution window.",
    )
    max_pending_clicks: int = Field(
        default=1_000_000,
        ge=1,
        description="Clicks waiting for their time at most; later clicks are dropped and counted.",
    )

    population_drift_after_seconds: float | None = Field(
        default=None,
        gt=0,
        description="Seconds after start at which the population changes; unset never drifts.",
    )
    population_drift_base_click_rate: float | None = Field(default=None, gt=0, lt=1)
    population_drift_flip_effects: str = Field(
        default="item,category",
        description="Comma-separated effects (item, category, price, segment) negated at drift.",
    )
    population_drift_reshuffle_popularity: bool = Field(
        default=True,
        description="At drift, give the item popularity ranks to other items, which moves the "
        "category mix and so the feature distributions.",
    )
    population_drift_new_item_share: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Share of impressions after drift that show items of categories never seen.",
    )
    population_drift_missing_price_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Share of impressions after drift sent without the price feature.",
    )

    @model_validator(mode="after")
    def _check(self) -> SimulatorSettings:
        unknown = set(self.population_drift_effects) - {"item", "category", "price", "segment"}
        if unknown:
            raise ValueError(
                f"population_drift_flip_effects has unknown effects {sorted(unknown)}; "
                "use item, category, price or segment, separated by commas"
            )
        if not self.scorer_url.startswith(("http://", "https://")):
            raise ValueError(
                f"scorer_url must start with http:// or https://, got {self.scorer_url!r}"
            )
        return self

    @property
    def population_drift_effects(self) -> list[str]:
        """The effects the drift negates."""
        return [
            name.strip() for name in self.population_drift_flip_effects.split(",") if name.strip()
        ]
