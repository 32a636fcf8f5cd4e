"""Event model: impressions, clicks and labelled examples.

The same models parse recorded streams, Kafka message values and scorer
requests, so one set of rules decides what is valid everywhere. Parsing never
raises anything but :class:`~shared.errors.InvalidEventError`.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
from functools import cached_property
from typing import Annotated, Any, Literal

import orjson
import pydantic
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
)
from pydantic_core import PydanticCustomError

from shared.errors import InvalidEventError

SCHEMA_VERSION = 1

MAX_ID_CHARS = 256
MAX_FEATURES = 256
MAX_FEATURE_NAME_CHARS = 128
MAX_FEATURE_TEXT_CHARS = 1024
# Kafka's default message.max.bytes is 1 MB; a valid event is far smaller.
MAX_EVENT_BYTES = 64 * 1024
# Integer features must fit in a signed 64-bit integer: orjson, which writes
# the wire format and the join store's records, raises on anything wider.
MIN_FEATURE_INT = -(2**63)
MAX_FEATURE_INT = 2**63 - 1


def _to_utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC)


_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f]")


def _reject_control_characters(value: str) -> str:
    if _CONTROL_CHARACTER.search(value):
        raise PydanticCustomError("control_characters", "must not contain control characters")
    return value


def _check_integer_range(value: Any) -> Any:
    # JSON true and false arrive as bool, a subclass of int, and are not integers here.
    if type(value) is int and not MIN_FEATURE_INT <= value <= MAX_FEATURE_INT:
        raise PydanticCustomError(
            "int_range", "integers must be between -2**63 and 2**63 - 1 (64-bit signed)"
        )
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
# Order matters: bool before int, because JSON true must stay a bool. The
# range check runs first, because StrictFloat would accept a wide int.
FeatureValue = Annotated[
    pydantic.StrictBool | pydantic.StrictInt | pydantic.StrictFloat | FeatureText,
    Field(union_mode="left_to_right"),
    BeforeValidator(_check_integer_range),
]
FEATURE_VALUE_RULE = "must be a boolean, a 64-bit integer, a finite number or a string"
Features = Annotated[dict[FeatureName, FeatureValue], Field(max_length=MAX_FEATURES)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)


class LabelSource(enum.StrEnum):
    """The way an example's label was decided."""

    CLICK = "click"
    WINDOW_CLOSED = "window_closed"
    LATE_CLICK_CORRECTION = "late_click_correction"
    # Not a decided label: the notice that an impression was served, emitted
    # when the joiner first reads it, for trainers that learn every impression
    # as a negative at once (fake-negative calibration). Its label is always 0.
    SERVED = "served"


class ServedScore(_Model):
    """The scorer's response for an impression, logged with it."""

    model_version: str = Field(max_length=MAX_ID_CHARS)
    arm: Literal["champion", "challenger", "replay"] = "champion"
    probability: float = Field(ge=0.0, le=1.0)
    baseline_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    # In shadow mode the challenger scores the impression too, but the caller
    # receives the champion's probability.
    shadow_probability: float | None = Field(default=None, ge=0.0, le=1.0)


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
        """Return the feature dict a model learns and scores from: the features plus the item id.

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

    @pydantic.model_validator(mode="after")
    def _served_is_negative(self) -> LabeledExample:
        if self.label_source == LabelSource.SERVED and self.label != 0:
            raise ValueError(
                f"invalid label {self.label} for label_source 'served': a served notice "
                "is not a click, so its label must be 0"
            )
        return self

    @property
    def dedup_key(self) -> str:
        """The identity trainers de-duplicate on.

        A late-click correction shares its impression id with the negative it
        corrects, so the label source is part of the key.
        """
        return f"{self.impression.impression_id}/{self.label_source.value}"


Event = Annotated[Impression | Click, Field(discriminator="type")]

_event_adapter: pydantic.TypeAdapter[Impression | Click] = pydantic.TypeAdapter(Event)


def _first_error(
    error: pydantic.ValidationError, raw: Any, tagged: bool = False
) -> InvalidEventError:
    """Convert pydantic's first error into the project's error type.

    The field of the result becomes part of a metric label. So it is always a
    schema field name or ``$`` and never a name the producer chose, except
    for a feature's own name after ``features.``.
    """
    errors = error.errors(include_url=False)
    detail = errors[0]
    loc = tuple(detail.get("loc", ()))
    # The discriminated union puts its tag first, and the tag is not a field the producer wrote.
    if tagged and loc and loc[0] in ("impression", "click") and loc != ("type",):
        loc = loc[1:]
    parts = [str(part) for part in loc]
    value = detail.get("input", raw)
    rule = detail.get("msg", "invalid")
    code = detail.get("type", "invalid")

    if code == "json_invalid":
        parts, rule = [], f"must be valid JSON: {rule}"
    elif code in ("union_tag_not_found", "union_tag_invalid"):
        parts, rule = ["type"], "must be 'impression' or 'click'"
    elif code == "extra_forbidden":
        value, parts = parts[-1], parts[:-1]
        rule = "must contain only the fields of the event schema"
    elif "features" in parts[:-1]:
        name_end = parts.index("features") + 2
        if parts[-1] == "[key]":
            value, rule = parts[name_end - 1], f"feature names: {rule}"
            parts = parts[: name_end - 1]
        elif len(parts) > name_end:
            # A feature value failed every member of its union. The first error
            # is the boolean member's, so look for a constraint a member broke.
            rule, code = _feature_value_rule(errors, detail["loc"][:-1])
            parts = parts[:name_end]

    location = ".".join(parts) or "$"
    return InvalidEventError(location, value, rule, code=code)


def _feature_value_rule(errors: list[Any], feature_loc: tuple) -> tuple[str, str]:
    """Return the rule and code of the first constraint, not type, error of one feature value."""
    for detail in errors:
        same_feature = tuple(detail["loc"][: len(feature_loc)]) == feature_loc
        if same_feature and not detail["type"].endswith("_type"):
            return detail["msg"], detail["type"]
    return FEATURE_VALUE_RULE, "feature_value_type"


def _check_size(raw: bytes | str) -> None:
    if len(raw) > MAX_EVENT_BYTES:
        raise InvalidEventError(
            "$", f"<{len(raw)} bytes>", f"must be at most {MAX_EVENT_BYTES} bytes", code="too_large"
        )


# The end of a key: a quote, optional JSON whitespace, then a colon.
_KEY_END = re.compile(rb'"\s*:')


def _reject_duplicate_keys(raw: bytes | str, model: BaseModel) -> None:
    """Raise InvalidEventError when a JSON object in ``raw`` repeats a key.

    pydantic keeps the last value of a repeated key, while other consumers of
    the same record may keep the first, so such an event is rejected. The
    exact check parses the JSON a second time, which made ``parse_event``
    roughly 1.5 times as slow on the bundled OBD sample events. A cheap count
    decides when it is needed: without backslashes every quote delimits a
    string, so each key ends in a match of ``_KEY_END``, and a count equal to
    the keys the model received proves that none repeats. A string value that
    starts with a colon only forces the exact check.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    if b"\\" not in data and len(_KEY_END.findall(data)) == _count_keys(model):
        return
    try:
        parsed = json.loads(data, object_pairs_hook=_PairsDict)
    except ValueError as error:
        # pydantic accepted this JSON already; this guards against the two parsers differing.
        raise InvalidEventError(
            "$", raw, f"must be valid JSON: {error}", code="json_invalid"
        ) from None
    duplicate = _find_duplicate_key(parsed)
    if duplicate is not None:
        location, values = duplicate
        raise InvalidEventError(
            location,
            values,
            "duplicate key: each key may appear only once in a JSON object",
            code="duplicate_key",
        )


def _count_keys(model: BaseModel) -> int:
    """Return the number of distinct keys of the JSON objects that validated into ``model``.

    A dict field counts its own keys only, because the only dict fields,
    ``features``, hold flat values. A nested dict would make the count too
    low, which costs the exact check but never hides a duplicate.
    """
    count = 0
    for name in model.model_fields_set:
        count += 1
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            count += _count_keys(value)
        elif isinstance(value, dict):
            count += len(value)
    return count


class _PairsDict(dict):
    """A JSON object that remembers the first key it received twice, with both values."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        self.duplicate: tuple[str, list[Any]] | None = None
        if len(self) != len(pairs):
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    self.duplicate = (key, [seen[key], value])
                    break
                seen[key] = value


def _find_duplicate_key(value: Any) -> tuple[str, list[Any]] | None:
    """Return the dotted path of the first repeated key and its values, or None."""
    if not isinstance(value, _PairsDict):
        return None
    if value.duplicate is not None:
        return value.duplicate
    for key, item in value.items():
        inner = _find_duplicate_key(item)
        if inner is not None:
            return f"{key}.{inner[0]}", inner[1]
    return None


def check_event_time(
    event: Impression | Click, now: float, min_event_time: dt.datetime, max_future_seconds: float
) -> None:
    """Raise InvalidEventError when an event time is implausible for a live stream.

    An event time before ``min_event_time`` or more than
    ``max_future_seconds`` after ``now`` (the consumer's processing clock, in
    seconds since the Unix epoch) is rejected. Parsing cannot check this
    because it has no clock, and the join must stay free of one.
    """
    if event.event_time < min_event_time:
        raise InvalidEventError(
            "event_time",
            event.event_time.isoformat(),
            f"must not be before {min_event_time.isoformat()}",
            hint=(
                "fix the producer's clock, or lower the consumer's minimum event time if such "
                "old events are expected; the consumer skips it"
            ),
            code="before_minimum",
        )
    if event.ts - now > max_future_seconds:
        now_text = dt.datetime.fromtimestamp(now, dt.UTC).isoformat()
        raise InvalidEventError(
            "event_time",
            event.event_time.isoformat(),
            f"must be at most {max_future_seconds:g} s ahead of the consumer's clock ({now_text})",
            hint="fix the producer's clock; the consumer skips it",
            code="in_future",
        )


def parse_event(raw: bytes | str) -> Impression | Click:
    """Parse one JSON-encoded impression or click, tagged by its ``type`` field."""
    _check_size(raw)
    try:
        event = _event_adapter.validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw, tagged=True) from None
    _reject_duplicate_keys(raw, event)
    return event


def parse_impression(raw: bytes | str) -> Impression:
    """Parse one JSON-encoded impression; the ``type`` field may be omitted."""
    _check_size(raw)
    try:
        event = Impression.model_validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw) from None
    _reject_duplicate_keys(raw, event)
    return event


def parse_click(raw: bytes | str) -> Click:
    """Parse one JSON-encoded click; the ``type`` field may be omitted."""
    _check_size(raw)
    try:
        event = Click.model_validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw) from None
    _reject_duplicate_keys(raw, event)
    return event


def parse_example(raw: bytes | str) -> LabeledExample:
    """Parse one JSON-encoded labelled example."""
    try:
        example = LabeledExample.model_validate_json(raw)
    except pydantic.ValidationError as error:
        raise _first_error(error, raw) from None
    _reject_duplicate_keys(raw, example)
    return example


def encode(model: BaseModel) -> bytes:
    """Serialise an event or example to compact JSON, the wire and file format."""
    return orjson.dumps(model.model_dump(mode="json", exclude_none=True))
