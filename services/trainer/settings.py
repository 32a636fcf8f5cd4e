"""Settings of the trainer service (``ONLINE_CTR_*`` environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from shared.learn.models import DEFAULT_MODEL
from shared.settings import ServiceSettings


class TrainerSettings(ServiceSettings):
    """Everything the trainer reads at start-up."""

    trainer_group_id: str = "online-ctr-trainer"
    metrics_port: int = Field(default=9102, ge=0, le=65535)

    model: str = Field(default=DEFAULT_MODEL, description="Model from the registry to train.")
    model_slot: str = Field(
        default="champion",
        description="Name under which snapshots are published; the scorer serves this name.",
    )
    signing_keys: SecretStr | None = Field(
        default=None, description="Comma-separated key_id:secret pairs for signing snapshots."
    )
    signing_key_id: str | None = Field(default=None, description="The key id that signs.")
    registry_namespace: str = "octr:models"
    retain_snapshots: int = Field(default=10, ge=1)

    snapshot_every_examples: int = Field(default=10_000, ge=1)
    snapshot_every_seconds: float = Field(default=30.0, gt=0)
    dedup_namespace: str = "octr:trainer"
    dedup_horizon_seconds: int = Field(
        default=6 * 3600,
        ge=1,
        description=(
            "How long an example's first sighting is remembered to drop duplicates; Redis "
            "holds about 100 bytes per example for this long."
        ),
    )
    rolling_window: int = Field(default=10_000, ge=1)
    segment_by: str = Field(default="", description="Comma-separated feature names to segment by.")

    negative_sampling_rate: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Share of negative examples learned; 1 learns every example.",
    )
    negative_sampling_correction: Literal["weight", "recalibrate"] = Field(
        default="recalibrate",
        description=(
            "weight: learn kept negatives with weight 1/rate; recalibrate: learn them with "
            "weight 1 and map predictions back with p / (p + (1 - p) / rate)."
        ),
    )

    delayed_feedback: Literal["none", "fake_negative"] = Field(
        default="none",
        description=(
            "fake_negative learns each impression as a negative from the joiner's served "
            "notice and calibrates, which removes the start-up bias; it needs "
            "ONLINE_CTR_EMIT_SERVED=true on the joiner. none learns each decided example."
        ),
    )

    max_poll_records: int = Field(default=2000, ge=1)
    poll_timeout_ms: int = Field(default=200, ge=0)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    fetch_max_wait_ms: int = Field(default=100, ge=0)

    @model_validator(mode="after")
    def _check(self) -> TrainerSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                "heartbeat_interval_ms must be at most a third of session_timeout_ms "
                f"(got {self.heartbeat_interval_ms} and {self.session_timeout_ms})"
            )
        if self.delayed_feedback == "fake_negative" and self.negative_sampling_rate < 1:
            raise ValueError(
                "fake_negative delayed feedback learns every impression as a negative, so it "
                "cannot be combined with negative downsampling; set "
                "ONLINE_CTR_NEGATIVE_SAMPLING_RATE=1 or ONLINE_CTR_DELAYED_FEEDBACK=none"
            )
        if (
            self.model == "select"
            and self.negative_sampling_rate < 1
            and self.negative_sampling_correction == "weight"
        ):
            raise ValueError(
                "the select model learns without sample weights, so it cannot take weighted "
                "negatives; set ONLINE_CTR_NEGATIVE_SAMPLING_CORRECTION=recalibrate"
            )
        if (self.signing_keys is None) != (self.signing_key_id is None):
            raise ValueError(
                "set both ONLINE_CTR_SIGNING_KEYS and ONLINE_CTR_SIGNING_KEY_ID, or neither"
            )
        return self

    @property
    def segment_features(self) -> list[str]:
        """The features to segment metrics by."""
        return [name.strip() for name in self.segment_by.split(",") if name.strip()]
