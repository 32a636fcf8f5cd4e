"""Fuzzing the event parsers: they raise nothing but InvalidEventError, whatever the input.

Each property runs a bounded number of examples, so the file takes well
under a minute. Accepted events must also survive ``encode`` and parse back
equal, because the joiner writes every accepted impression to Redis and
Kafka with the same encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidEventError
from shared.events import (
    Click,
    Impression,
    LabeledExample,
    ServedScore,
    encode,
    parse_click,
    parse_event,
    parse_example,
    parse_impression,
)

PARSERS: dict[str, Callable[[bytes | str], Any]] = {
    "event": parse_event,
    "impression": parse_impression,
    "click": parse_click,
    "example": parse_example,
}
# A reason label starts with one of these, whatever the input.
REASON_FIELDS = (
    set(Impression.model_fields)
    | set(Click.model_fields)
    | set(LabeledExample.model_fields)
    | {"$"}
)
FUZZ_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    # The 64-bit limits, which unbounded integers rarely reach.
    | st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64])
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["2024-05-01T12:00:00Z", "2024-05-01T12:00:00", "1e999", ""])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
identifiers = st.text(max_size=300) | st.sampled_from(["a", "imp-1", "x" * 256, "x" * 257])
event_times = (
    st.datetimes(timezones=st.timezones()).map(lambda moment: moment.isoformat())
    | st.datetimes().map(lambda moment: moment.isoformat())
    | st.floats(min_value=-1e12, max_value=1e12)
    | json_values
)
feature_maps = (
    st.dictionaries(st.text(max_size=130), json_scalars | json_values, max_size=6) | json_values
)
served_scores = (
    st.fixed_dictionaries(
        {"model_version": st.text(max_size=10), "probability": st.floats()},
        optional={
            "arm": st.sampled_from(["champion", "challenger", "replay", "other"]),
            "baseline_probability": st.floats() | st.none(),
        },
    )
    | json_values
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["impression", "click", "example", "conversion"]) | json_values,
        "schema_version": st.sampled_from([1, 2, "1"]) | json_values,
        "impression_id": identifiers | json_values,
        "event_time": event_times,
        "item_id": identifiers | json_values,
        "user_id": identifiers | st.none(),
        "features": feature_maps,
        "served": served_scores,
        "surprise": json_values,
    },
)


FIELD_VALUES = {
    "type": st.sampled_from(["impression", "click", "example", "conversion"]),
    "schema_version": st.sampled_from([1, 2, "1"]),
    "impression_id": identifiers,
    "event_time": event_times,
    "item_id": identifiers,
    "user_id": identifiers | st.none(),
    "features": st.dictionaries(st.text(max_size=130), json_scalars, max_size=6)
    | st.dictionaries(st.sampled_from(["ad", "price", "n"]), json_scalars, max_size=3),
    "served": served_scores,
    "surprise": json_values,
}


@st.composite
def nearly_valid_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid impression or click with one to three fields replaced or removed."""
    document = json.loads(draw(st.sampled_from(SEEDS)))
    for name in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=3)):
        if draw(st.integers(0, 4)) == 0:
            document.pop(name, None)
        else:
            document[name] = draw(FIELD_VALUES[name])
    return document


def seed_events() -> list[bytes]:
    """Valid events to mutate, in compact and in spaced JSON."""
    impression = Impression(
        impression_id="imp-1",
        event_time="2024-05-01T12:00:00Z",
        user_id="user-1",
        item_id="item-1",
        features={"ad": "a", "price": 1.5, "count": 3, "new": True},
        served=ServedScore(model_version="m1", probability=0.25),
    )
    click = Click(impression_id="imp-1", event_time="2024-05-01T12:00:05Z")
    seeds = []
    for event in (impression, click):
        seeds.append(encode(event))
        seeds.append(json.dumps(json.loads(encode(event)), indent=1).encode())
    return seeds


SEEDS = seed_events()


@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid event with one to four byte-level edits."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(0, len(data) - 1)))
        edit = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "repeat"]))
        if edit == "replace" and data:
            data[position] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif edit == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        elif edit == "truncate":
            del data[position:]
        else:
            end = position + draw(st.integers(1, 40))
            data[position:position] = data[position:end]
    return bytes(data)


def check_parse(parser: Callable[[bytes | str], Any], raw: bytes | str) -> None:
    """Parse ``raw``: an error must be InvalidEventError, and success must round-trip."""
    try:
        parsed = parser(raw)
    except InvalidEventError as error:
        assert error.reason.split(":", 1)[0] in REASON_FIELDS, error.reason
        assert error.field and error.rule
        return
    assert parser(encode(parsed)) == parsed


@FUZZ_SETTINGS
@given(st.sampled_from(sorted(PARSERS)), st.binary(max_size=600))
def test_arbitrary_bytes(parser_name: str, raw: bytes) -> None:
    check_parse(PARSERS[parser_name], raw)


@FUZZ_SETTINGS
@given(st.sampled_from(sorted(PARSERS)), st.text(alphabet=st.characters(codec=None), max_size=200))
def test_arbitrary_text_with_surrogates(parser_name: str, raw: str) -> None:
    check_parse(PARSERS[parser_name], raw)


@FUZZ_SETTINGS
@given(st.sampled_from(sorted(PARSERS)), json_values, st.booleans())
def test_arbitrary_json_values(parser_name: str, value: Any, ascii_only: bool) -> None:
    check_parse(PARSERS[parser_name], json.dumps(value, ensure_ascii=ascii_only).encode())


@FUZZ_SETTINGS
@given(st.sampled_from(["event", "impression", "click"]), event_like, st.booleans())
def test_event_shaped_objects(parser_name: str, document: dict, compact: bool) -> None:
    separators = (",", ":") if compact else (", ", " : ")
    check_parse(PARSERS[parser_name], json.dumps(document, separators=separators).encode())


@FUZZ_SETTINGS
@given(nearly_valid_events(), st.booleans())
def test_nearly_valid_events(document: dict, compact: bool) -> None:
    separators = (",", ":") if compact else (", ", " : ")
    check_parse(parse_event, json.dumps(document, separators=separators).encode())


@FUZZ_SETTINGS
@given(st.sampled_from(["event", "impression", "click"]), mutated_events())
def test_mutated_valid_events(parser_name: str, raw: bytes) -> None:
    check_parse(PARSERS[parser_name], raw)


@st.composite
def events_with_repeated_key(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid impression whose JSON repeats one key, and the dotted path of that key."""
    document = json.loads(SEEDS[0])
    objects = {"": document, "features.": document["features"], "served.": document["served"]}
    prefix = draw(st.sampled_from(sorted(objects)))
    target = objects[prefix]
    key = draw(st.sampled_from(sorted(target)))
    # The repeated pair may come first or last; both copies carry the same
    # value, so only the repetition is wrong.
    pairs = list(target.items())
    position = draw(st.sampled_from([0, len(pairs)]))
    pairs.insert(position, (key, target[key]))
    target.clear()
    spacing = draw(st.sampled_from(['"{key}":', '"{key}" :', '"{key}"\n:']))
    escape = draw(st.booleans())

    def write(value: Any) -> str:
        if value is target:
            items = []
            for name, item in pairs:
                written = json.dumps(name)
                if escape and name == key:
                    written = '"' + "".join(f"\\u{ord(char):04x}" for char in name) + '"'
                items.append(spacing.replace('"{key}"', written) + write(item))
            return "{" + ",".join(items) + "}"
        if isinstance(value, dict):
            return "{" + ",".join(f"{json.dumps(k)}:{write(v)}" for k, v in value.items()) + "}"
        return json.dumps(value)

    return write(document).encode(), prefix + key


@FUZZ_SETTINGS
@given(events_with_repeated_key())
def test_repeated_key_always_rejected(case: tuple[bytes, str]) -> None:
    raw, path = case

    try:
        parse_event(raw)
    except InvalidEventError as error:
        assert error.code == "duplicate_key", error
        assert error.field == path
    else:
        raise AssertionError(f"accepted a repeated key {path!r}: {raw!r}")
