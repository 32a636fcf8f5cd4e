"""Labelled examples: a served notice is never a click."""

from __future__ import annotations

import json

import pytest

from shared.errors import InvalidEventError
from shared.events import Impression, LabelSource, parse_example


def served(label: int) -> bytes:
    impression = Impression(impression_id="i1", event_time=0, item_id="a")
    document = {
        "impression": impression.model_dump(mode="json"),
        "label": label,
        "label_delay_seconds": 0,
        "label_source": "served",
        "decided_at": "1970-01-01T00:00:00Z",
    }
    return json.dumps(document).encode()


def test_served_notice_parses() -> None:
    example = parse_example(served(0))

    assert example.label_source == LabelSource.SERVED
    assert example.dedup_key == "i1/served"


def test_served_click_rejected() -> None:
    with pytest.raises(InvalidEventError, match="invalid label 1 for label_source 'served'"):
        parse_example(served(1))
