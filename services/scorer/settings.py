"""Settings of the scorer service (``ONLINE_CTR_*`` environment variables)."""

from __future__ import annotations

from pydantic import Field, SecretStr, model_validator

from shared.errors import ConfigError
from shared.settings import ServiceSettings
from shared.snapshots import GENERATE_KEY_COMMAND, NAME_PATTERN, SigningKeys


class ScorerSettings(ServiceSettings):
    """Everything the scorer reads at start-up."""

    http_host: str = Field(default="0.0.0.0", description="Address the HTTP API listens on.")
    http_port: int = Field(default=8000, ge=1, le=65535, description="Port of the HTTP API.")
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "uvicorn worker processes; each loads its own model and subscribes to announcements."
        ),
    )
    metrics_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description=(
            "Extra port that serves only /metrics; 0 turns it off. The HTTP API serves "
            "/metrics on ONLINE_CTR_HTTP_PORT either way."
        ),
    )

    champion_slot: str = Field(
        default="champion",
        pattern=NAME_PATTERN.pattern,
        description="Registry model name served to most traffic.",
    )
    challenger_slot: str = Field(
        default="challenger",
        pattern=NAME_PATTERN.pattern,
        description="Registry model name of the challenger; loaded only when it gets traffic.",
    )
    challenger_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of users (by hash of user_id) whose requests the challenger scores.",
    )
    challenger_split_salt: str = Field(
        default="octr-challenger",
        min_length=1,
        max_length=64,
        description="Salt of the split hash; change it to assign users to arms afresh.",
    )
    shadow_mode: bool = Field(
        default=False,
        description=(
            "Score every request with both models, return the champion's score and log both."
        ),
    )

    signing_keys: SecretStr | None = Field(
        default=None,
        description=(
            "Comma-separated key_id:secret pairs; list every key id that may have signed "
            "a retained snapshot."
        ),
    )
    signing_key_id: str | None = Field(
        default=None,
        description="Active key id as for the trainer; optional, as the scorer only verifies.",
    )
    registry_namespace: str = "octr:models"
    allow_other_river_version: bool = Field(
        default=False,
        description="Load snapshots pickled by another River major.minor release.",
    )
    reload_poll_interval_seconds: float = Field(
        default=10.0,
        gt=0,
        description="How often the registry is polled in case an announcement was missed.",
    )
    max_model_age_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="/readyz fails when the champion snapshot is older than this.",
    )

    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Request bodies larger than this get 413 before they are parsed.",
    )
    max_batch_size: int = Field(
        default=1000, ge=1, le=10_000, description="Impressions per /v1/score/batch request."
    )

    log_impressions: bool = Field(
        default=True,
        description="Produce each scored impression to the impressions topic.",
    )
    log_queue_size: int = Field(
        default=10_000,
        ge=1,
        description=(
            "Impressions buffered for the Kafka producer; when it is full, new records are "
            "dropped and counted."
        ),
    )

    drift_window_size: int = Field(
        default=10_000, ge=10, description="Recent requests that drift metrics are computed over."
    )
    drift_refresh_seconds: float = Field(
        default=15.0, gt=0, description="How often the drift gauges are recomputed."
    )
    drift_detector_delta: float = Field(
        default=0.002,
        gt=0,
        lt=1,
        description="ADWIN confidence on the predicted click rate; smaller detects less often.",
    )
    psi_threshold: float = Field(
        default=0.25, gt=0, description="PSI above which a feature or the score has drifted."
    )
    missing_ratio_threshold: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="Rise in a feature's missing share over the reference that counts as drift.",
    )
    unseen_category_ratio_threshold: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Share of categorical values absent from the reference that counts as drift.",
    )

    @model_validator(mode="after")
    def _check(self) -> ScorerSettings:
        if self.champion_slot == self.challenger_slot:
            raise ValueError(
                f"champion_slot and challenger_slot are both {self.champion_slot!r}; "
                "give the challenger its own model name"
            )
        if self.shadow_mode and self.challenger_share > 0:
            raise ValueError(
                "shadow_mode sends every request to the champion, so challenger_share must be 0 "
                f"(got {self.challenger_share}); unset one of ONLINE_CTR_SHADOW_MODE and "
                "ONLINE_CTR_CHALLENGER_SHARE"
            )
        return self

    @property
    def serves_challenger(self) -> bool:
        """Whether the challenger slot is loaded: it gets live traffic or shadows the champion."""
        return self.shadow_mode or self.challenger_share > 0

    def verification_keys(self) -> SigningKeys:
        """Return the keys that verify snapshots; raise ConfigError when none are configured."""
        if self.signing_keys is None:
            raise ConfigError(
                "ONLINE_CTR_SIGNING_KEYS is required: the scorer serves only snapshots whose "
                "signature it verified. Set it to the trainer's keys, such as "
                f"ONLINE_CTR_SIGNING_KEYS=k1:<key>; a new key comes from: {GENERATE_KEY_COMMAND}"
            )
        active_key_id = self.signing_key_id
        if active_key_id is None:
            # SigningKeys needs an active id, which only signing uses: take the first listed.
            first_entry = self.signing_keys.get_secret_value().split(",", 1)[0]
            active_key_id = first_entry.partition(":")[0].strip()
        return SigningKeys.parse(self.signing_keys, active_key_id)
