"""Settings of the delayed-label join, shared by replay and the joiner service."""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LateClickPolicy(enum.StrEnum):
    """The handling of a click that arrives after its impression's window closed."""

    DROP = "drop"
    """Count it and emit nothing, so the negative is final."""

    CORRECT = "correct"
    """Count it and emit a positive correction example after the negative."""


class JoinSettings(BaseModel):
    """Attribution window, watermark lateness and the stated policies."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    window_seconds: float = Field(default=600.0, gt=0, description="Attribution window length.")
    allowed_lateness_seconds: float = Field(
        default=60.0,
        ge=0,
        description="How far the watermark trails the maximum event time seen.",
    )
    late_click_policy: LateClickPolicy = LateClickPolicy.DROP
    closed_retention_seconds: float | None = Field(
        default=None,
        ge=0,
        description=(
            "How long, in event time after its window ends, a decided impression is remembered "
            "so that duplicates and late clicks are recognised. Defaults to the window length."
        ),
    )

    emit_served: bool = Field(
        default=False,
        description=(
            "Also emit a 'served' example for each new impression when it is read, before "
            "its label, for trainers under fake-negative calibration."
        ),
    )

    @model_validator(mode="after")
    def _default_retention(self) -> JoinSettings:
        if self.closed_retention_seconds is None:
            object.__setattr__(self, "closed_retention_seconds", self.window_seconds)
        return self

    @property
    def retention_seconds(self) -> float:
        """The effective retention of decided impressions, in seconds of event time."""
        assert self.closed_retention_seconds is not None
        return self.closed_retention_seconds
