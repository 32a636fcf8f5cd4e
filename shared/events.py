"""Event model: impressions, clicks and labelled examples.

The same models parse recorded streams, Kafka message values and scorer
requests, so one set of rules decides what is valid everywhere. Parsing never
raises anything but :class:`~shared.errors.InvalidEventError`.
"""

from __future__ import annotations

import datetime as dt
import enum
from functools import cached_property
from typing import Annotated, Any, Literal

import orjson
import pydantic
from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from shared.errors import InvalidEventError

SCHEMA_VERSION = 1

MAX_ID_CHARS = 256
MAX_FEATURES = 256
MAX_FEATURE_NAME_CHARS = 128
MAX_FEATURE_TEXT_CHARS = 1024
# Kafka's default message.max.bytes is 1 MB; a valid event is far smaller.
MAX_EVENT_BYTES = 64 * 1024


def _to_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC)


def _reject_control_characters(value: str) -> str:
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise ValueError("must not contain control characters")
    return value


Identifier = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_ID_CHARS, strict=True),
    AfterValidator(_reject_control_characters),
]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
FeatureName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_FEATURE_NAME_CHARS, strict=True),
    AfterValidator(_reject_control_characters),
]
FeatureText = Annotated[str, StringConstraints(max_length=MAX_FEATURE_TEXT_CHARS, strict=True)]
# Order matters: bool before int, because JSON true must stay a bool.
FeatureValue = Annotated[
    pydantic.StrictBool | pydantic.StrictInt | pydantic.StrictFloat | FeatureText,
    Field(union_mode="left_to_right"),
]
Features = Annotated[dict[FeatureName, FeatureValue], Field(max_length=MAX_FEATURES)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class LabelSource(enum.StrEnum):
    """How an example's label was decided."""

    CLICK = "click"
    WINDOW_CLOSED = "window_closed"
    LATE_CLICK_CORRECTION = "late_click_correction"


class ServedScore(_Model):
    """What the scorer returned for an impression, logged with it."""

    model_version: str = Field(max_length=MAX_ID_CHARS)
    arm: Literal["champion", "challenger", "replay"] = "champion"
    probability: float = Field(ge=0.0, le=1.0)
    baseline_probability: float | None = Field(default=None, ge=0.0, le=1.0)


class Impression(_Model):
    """One item shown to one user at one moment."""

    type: Literal["impression"] = "impression"
    schema_version: Literal[1] = SCHEMA_VERSION
    impression_id: Identifier
    event_time: UtcDatetime
    user_id: Identifier | None = None
    item_id: Identifier
    features: Features = Field(default_factory=dict)
    served: ServedScore | None = None

    @cached_property
    def ts(self) -> float:
        """Event time in seconds since the Unix epoch."""
        return self.event_time.timestamp()

    def learning_features(self) -> dict[str, Any]:
        """Return the feature dict a model sees: the features plus the item id.

        The user id is left out on purpose: it is unbounded in cardinality and
        a model that wants it can get it as a feature from the producer.
        """
        return {"item_id": self.item_id, **self.features}


class Click(_Model):
    """A click on an earlier impression."""

    type: Literal["click"] = "click"
    schema_version: Literal[1] = SCHEMA_VERSION
    impression_id: Identifier
    event_time: UtcDatetime

    @cached_property
    def ts(self) -> float:
        """Event time in seconds since the Unix epoch."""
        return self.event_time.timestamp()


class LabeledExample(_Model):
    """An impression with its decided label, as the joiner emits it."""

    type: Literal["example"] = "example"
    schema_version: Literal[1] = SCHEMA_VERSION
    impression: Impression
    label: Literal[0, 1]
    label_delay_seconds: float = Field(ge=0.0)
    label_source: LabelSource
    decided_at: UtcDatetime

    @property
    def dedup_key(self) -> str:
        """The identity trainers de-duplicate on.

        A late-click correction shares its impression id with the negative it
        corrects, so the label source is part of the key.
        """
        return f"{self.impression.impression_id}/{self.label_source.value}"


Event = Annotated[Impression | Click, Field(discriminator="type")]

_event_adapter: pydantic.TypeAdapter[Impression | Click] = pydantic.TypeAdapter(Event)


def _first_error(error: pydantic.ValidationError, raw: Any) -> InvalidEventError:
    """Convert pydantic's first error into the project's error type."""
    detail = error.errors(include_url=False)[0]
    parts = [str(part) for part in detail.get("loc", ())]
    # The discriminated union puts the tag first and the feature union puts the
    # tried member type last; neither is a field the producer wrote.
    if parts and parts[0] in ("impression", "click") and detail.get("loc") != ("type",):
        parts = parts[1:]
    if len(parts) >= 3 and parts[0] == "features":
        parts = parts[:2]
    location = ".".join(parts) or "$"
    value = detail.get("input", raw)
    rule = detail.get("msg", "invalid")
    code = detail.get("type", "invalid")
    if code == "json_invalid":
        location, rule = "$", f"must be valid JSON: {rule}"
    elif code in ("union_tag_not_found", "union_tag_invalid"):
        location, rule = "type", "must be 'impression' or 'click'"
    return InvalidEventError(location, value, rule, code=code)


def _check_size(raw: bytes | str) -> None:
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEventError(
            "$", f"<{len(raw)} bytes>", f"must be at most {MAX_EVENT_BYTES} bytes", code="too_large"
        )


def parse_event(raw: bytes | str) -> Impression | Click:
    """Parse one JSON-encoded impression or click, tagged by its ``type`` field."""
    _check_size(raw)
    try:
        return _event_adapter.validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw) from None


def parse_impression(raw: bytes | str) -> Impression:
    """Parse one JSON-encoded impression; the ``type`` field may be omitted."""
    _check_size(raw)
    try:
        return Impression.model_validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw) from None


def parse_click(raw: bytes | str) -> Click:
    """Parse one JSON-encoded click; the ``type`` field may be omitted."""
    _check_size(raw)
    try:
        return Click.model_validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw) from None


def parse_example(raw: bytes | str) -> LabeledExample:
    """Parse one JSON-encoded labelled example."""
    try:
        return LabeledExample.model_validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw) from None


def encode(model: BaseModel) -> bytes:
    """Serialise an event or example to compact JSON, the wire and file format."""
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))
