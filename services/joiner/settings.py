"""Settings of the joiner service (``ONLINE_CTR_*`` environment variables)."""

from __future__ import annotations

import datetime as dt

from pydantic import AwareDatetime, Field, model_validator

from shared.join import JoinSettings, LateClickPolicy
from shared.settings import ServiceSettings


class JoinerSettings(ServiceSettings):
    """Everything the joiner reads at start-up."""

    joiner_group_id: str = "online-ctr-joiner"
    metrics_port: int = Field(default=9101, ge=0, le=65535)

    window_seconds: float = Field(default=600.0, gt=0)
    allowed_lateness_seconds: float = Field(default=60.0, ge=0)
    late_click_policy: LateClickPolicy = LateClickPolicy.DROP
    emit_served: bool = Field(
        default=False,
        description=(
            "Also emit a 'served' example for each new impression, before its label, for a "
            "trainer with ONLINE_CTR_DELAYED_FEEDBACK=fake_negative."
        ),
    )
    closed_retention_seconds: float | None = Field(default=None, ge=0)
    idle_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        description=(
            "Processing-time seconds a partition may stay caught up with no new events before "
            "its open windows are closed by moving its event time forward by window plus "
            "lateness. Off by default; clicks arriving afterwards for those impressions are late."
        ),
    )

    min_event_time: AwareDatetime = Field(
        default=dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
        description=(
            "Events with an earlier event time go to the dead-letter topic. Lower it (an ISO "
            "8601 time with a UTC offset) to join older recorded data."
        ),
    )
    max_event_future_seconds: float = Field(
        default=86_400.0,
        gt=0,
        description=(
            "How many seconds an event time may be ahead of the joiner's clock. Events further "
            "ahead go to the dead-letter topic."
        ),
    )

    redis_namespace: str = Field(default="octr:join", min_length=1)

    max_poll_records: int = Field(default=2000, ge=1)
    poll_timeout_ms: int = Field(default=200, ge=0)
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3000, ge=100)
    max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    fetch_max_wait_ms: int = Field(default=100, ge=0)
    buffer_max_records: int = Field(
        default=50_000,
        ge=1,
        description=(
            "Records buffered per topic-partition before it is paused to let the other topic "
            "catch up in event time."
        ),
    )
    retry_max_backoff_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _check_timeouts(self) -> JoinerSettings:
        # kafka-python's rule: heartbeats must come well inside the session timeout.
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError(
                "heartbeat_interval_ms must be at most a third of session_timeout_ms "
                f"(got {self.heartbeat_interval_ms} and {self.session_timeout_ms})"
            )
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError(
                "max_poll_interval_ms must not be shorter than session_timeout_ms "
                f"(got {self.max_poll_interval_ms} and {self.session_timeout_ms})"
            )
        return self

    def join_settings(self) -> JoinSettings:
        """Return the join's window and policies."""
        return JoinSettings(
            emit_served=self.emit_served,
            window_seconds=self.window_seconds,
            allowed_lateness_seconds=self.allowed_lateness_seconds,
            late_click_policy=self.late_click_policy,
            closed_retention_seconds=self.closed_retention_seconds,
        )
