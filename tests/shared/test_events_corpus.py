"""Every entry of the bad-event corpus is rejected by the event module with a usable error.

Entries rejected by the joiner's record checks (null value, key) parse as
valid events here; ``tests/services/joiner/test_dead_letter.py`` runs the
whole corpus through the joiner.
"""

from __future__ import annotations

import datetime as dt
import re
import time

import pytest

from services.joiner.settings import JoinerSettings
from shared.errors import InvalidEventError
from shared.events import (
    Click,
    Impression,
    check_event_time,
    encode,
    parse_click,
    parse_impression,
)
from tests.fixtures.bad_events import BadEvent, build_corpus

CORPUS = build_corpus()
DEFAULTS = JoinerSettings.model_fields
MIN_EVENT_TIME: dt.datetime = DEFAULTS["min_event_time"].default
MAX_FUTURE_SECONDS: float = DEFAULTS["max_event_future_seconds"].default
# Field names a reason label may start with: the schema's fields and "$".
SCHEMA_FIELDS = set(Impression.model_fields) | set(Click.model_fields) | {"$"}
REASON_PATTERN = re.compile(r"^[a-z_$]+:[a-z_]+$")


def validate(entry: BadEvent, now: float) -> Impression | Click:
    """Apply the parser and the event-time check the joiner applies to this entry's topic."""
    assert entry.value is not None
    parse = parse_impression if entry.topic == "impressions" else parse_click
    event = parse(entry.value)
    check_event_time(event, now, MIN_EVENT_TIME, MAX_FUTURE_SECONDS)
    return event


def test_corpus_has_every_required_kind() -> None:
    kinds = {entry.kind for entry in CORPUS}

    assert len(CORPUS) >= 30
    for required in (
        "not-json",
        "top-level-array",
        "missing-id",
        "empty-id",
        "too-long-id",
        "numeric-id",
        "nan-feature",
        "infinite-feature",
        "naive-event-time",
        "years-in-the-past",
        "years-in-the-future",
        "too-many-features",
        "nested-feature-object",
        "id-control-character",
        "invalid-utf8",
        "unknown-schema-version",
        "key-mismatch",
        "duplicate-id-key",
        "oversized-message",
        "tombstone",
    ):
        assert required in kinds, required


@pytest.mark.parametrize(
    "entry", [e for e in CORPUS if e.check != "record"], ids=lambda entry: entry.kind
)
def test_entry_raises_invalid_event_error(entry: BadEvent) -> None:
    with pytest.raises(InvalidEventError) as caught:
        validate(entry, time.time())

    error = caught.value
    assert error.field == entry.field
    assert entry.rule in error.rule
    assert f"field {entry.field!r}" in str(error)
    assert entry.rule in str(error)


@pytest.mark.parametrize(
    "entry",
    [e for e in CORPUS if e.check == "record" and e.value is not None],
    ids=lambda entry: entry.kind,
)
def test_record_fault_parses_as_event(entry: BadEvent) -> None:
    event = validate(entry, time.time())

    assert event.impression_id.encode() != entry.key


@pytest.mark.parametrize(
    "entry", [e for e in CORPUS if e.check == "event_time"], ids=lambda entry: entry.kind
)
def test_time_fault_parses_without_clock(entry: BadEvent) -> None:
    assert entry.value is not None
    parse = parse_impression if entry.topic == "impressions" else parse_click

    event = parse(entry.value)

    assert event.impression_id == entry.kind


def test_reasons_are_low_cardinality() -> None:
    reasons = set()
    for entry in CORPUS:
        if entry.check == "record":
            continue
        with pytest.raises(InvalidEventError) as caught:
            validate(entry, time.time())
        reasons.add(caught.value.reason)

    for reason in reasons:
        assert REASON_PATTERN.match(reason), reason
        assert reason.split(":")[0] in SCHEMA_FIELDS, reason
    # Several kinds share a reason; the label set stays far below the corpus size.
    assert len(reasons) < len(CORPUS)


def test_reason_leaves_out_producer_names() -> None:
    raw = b'{"impression_id":"a","event_time":"2024-05-01T12:00:00Z","user-chosen-name":1}'

    with pytest.raises(InvalidEventError) as caught:
        parse_click(raw)

    assert caught.value.reason == "$:extra_forbidden"
    assert "user-chosen-name" in str(caught.value)


def test_event_time_limits_are_inclusive_at_the_edges() -> None:
    now = dt.datetime(2024, 5, 1, tzinfo=dt.UTC).timestamp()
    at_minimum = Click(impression_id="a", event_time=MIN_EVENT_TIME)
    at_maximum = Click(impression_id="a", event_time=now + MAX_FUTURE_SECONDS)
    past_maximum = Click(impression_id="a", event_time=now + MAX_FUTURE_SECONDS + 1)

    check_event_time(at_minimum, now, MIN_EVENT_TIME, MAX_FUTURE_SECONDS)
    check_event_time(at_maximum, now, MIN_EVENT_TIME, MAX_FUTURE_SECONDS)
    with pytest.raises(InvalidEventError, match="ahead of the consumer's clock"):
        check_event_time(past_maximum, now, MIN_EVENT_TIME, MAX_FUTURE_SECONDS)


def test_lowered_minimum_accepts_epoch_times() -> None:
    settings = JoinerSettings(min_event_time="1970-01-01T00:00:00Z")
    click = Click(impression_id="a", event_time=0)

    check_event_time(click, 0.0, settings.min_event_time, settings.max_event_future_seconds)


def test_duplicate_key_check_is_exact() -> None:
    # A value that starts with a colon makes the cheap count overestimate and
    # forces the exact check, which must still accept the event.
    raw = b'{"impression_id":"a","event_time":"2024-05-01T12:00:00Z","item_id":":x","features":{}}'
    escaped = b'{"impression_id":"a\\u0041","event_time":"2024-05-01T12:00:00Z","item_id":"b"}'

    assert parse_impression(raw).item_id == ":x"
    assert parse_impression(escaped).impression_id == "aA"


def test_widest_integer_feature_round_trips() -> None:
    raw = (
        b'{"impression_id":"a","event_time":"2024-05-01T12:00:00Z","item_id":"b",'
        b'"features":{"low":-9223372036854775808,"high":9223372036854775807}}'
    )

    event = parse_impression(raw)

    assert parse_impression(encode(event)) == event
