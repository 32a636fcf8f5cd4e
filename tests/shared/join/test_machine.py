"""The join state machine's case table, run on every store and in two batchings.

Conventions follow the product's stated defaults: window W = 600 s, allowed
lateness L = 60 s, so an impression at t closes when an event at t + 660 or
later arrives. Events are ``("i", id, t)`` for an impression and
``("c", id, t)`` for a click.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from shared.events import Click, Impression
from shared.join import JoinOutcome, JoinStateMachine

Event = tuple[str, str, float]


def build_events(spec: list[Event]) -> list[Impression | Click]:
    events: list[Impression | Click] = []
    for kind, impression_id, event_time in spec:
        if kind == "i":
            events.append(
                Impression(
                    impression_id=impression_id,
                    event_time=event_time,
                    item_id="a",
                    features={"ad": "a"},
                )
            )
        else:
            events.append(Click(impression_id=impression_id, event_time=event_time))
    return events


@dataclass
class Case:
    name: str
    events: list[Event]
    expected: list[tuple[str, int, str]]
    counts: dict[JoinOutcome, int] = field(default_factory=dict)
    pending: int | None = None
    settings: dict[str, object] = field(default_factory=dict)
    flush: bool = False


Outcome = JoinOutcome
CASES = [
    Case(
        "click inside window is positive at once",
        [("i", "i1", 0), ("c", "i1", 10)],
        [("i1", 1, "click")],
        {Outcome.CLICK_ATTRIBUTED: 1},
        pending=0,
    ),
    Case(
        "window closes when watermark reaches deadline",
        [("i", "i1", 0), ("i", "i2", 659), ("i", "i3", 660)],
        [("i1", 0, "window_closed")],
        {Outcome.WINDOW_CLOSED: 1, Outcome.IMPRESSION_OPENED: 3},
        pending=2,
    ),
    Case(
        "watermark one second short keeps window open",
        [("i", "i1", 0), ("i", "i2", 659)],
        [],
        pending=2,
    ),
    Case(
        "duplicate impression first wins",
        [("i", "i1", 0), ("i", "i1", 5), ("c", "i1", 10)],
        [("i1", 1, "click")],
        {Outcome.IMPRESSION_DUPLICATE: 1, Outcome.IMPRESSION_OPENED: 1},
    ),
    Case(
        "duplicate click first wins",
        [("i", "i1", 0), ("c", "i1", 10), ("c", "i1", 12)],
        [("i1", 1, "click")],
        {Outcome.CLICK_DUPLICATE: 1, Outcome.CLICK_ATTRIBUTED: 1},
    ),
    Case(
        "no early negative",
        [("i", "i1", 0), ("i", "i2", 500), ("c", "i1", 590), ("i", "i3", 655), ("i", "i4", 700)],
        [("i1", 1, "click")],
        {Outcome.WINDOW_CLOSED: 0},
        pending=3,
    ),
    Case(
        "late click dropped and counted",
        [("i", "i1", 0), ("i", "i2", 700), ("c", "i1", 300)],
        [("i1", 0, "window_closed")],
        {Outcome.CLICK_LATE: 1, Outcome.CORRECTION_EMITTED: 0},
    ),
    Case(
        "late click corrected",
        [("i", "i1", 0), ("i", "i2", 700), ("c", "i1", 300)],
        [("i1", 0, "window_closed"), ("i1", 1, "late_click_correction")],
        {Outcome.CLICK_LATE: 1, Outcome.CORRECTION_EMITTED: 1},
        settings={"late_click_policy": "correct"},
    ),
    Case(
        "second late click is a duplicate",
        [("i", "i1", 0), ("i", "i2", 700), ("c", "i1", 300), ("c", "i1", 301)],
        [("i1", 0, "window_closed"), ("i1", 1, "late_click_correction")],
        {Outcome.CLICK_LATE: 1, Outcome.CLICK_DUPLICATE: 1, Outcome.CORRECTION_EMITTED: 1},
        settings={"late_click_policy": "correct"},
    ),
    Case(
        "click after window while pending decides negative then late",
        [("i", "i1", 0), ("i", "i2", 620), ("c", "i1", 610)],
        [("i1", 0, "window_closed")],
        {Outcome.CLICK_LATE: 1, Outcome.WINDOW_CLOSED: 1},
        pending=1,
    ),
    Case(
        "orphan click matched by later impression",
        [("c", "i1", 5), ("i", "i1", 0)],
        [("i1", 1, "click")],
        {Outcome.CLICK_HELD: 1, Outcome.CLICK_ORPHAN_MATCHED: 1, Outcome.CLICK_ATTRIBUTED: 1},
        pending=0,
    ),
    Case(
        "orphan click expires when watermark passes it",
        [("c", "i9", 5), ("i", "i2", 64), ("i", "i3", 66)],
        [],
        {Outcome.CLICK_HELD: 1, Outcome.CLICK_ORPHAN_EXPIRED: 1},
        pending=2,
    ),
    Case(
        "orphan click behind watermark expires at once",
        [("i", "i2", 700), ("c", "i9", 5)],
        [],
        {Outcome.CLICK_HELD: 0, Outcome.CLICK_ORPHAN_EXPIRED: 1},
    ),
    Case(
        "click before its impression time is ignored",
        [("i", "i1", 100), ("c", "i1", 50), ("i", "i2", 800)],
        [("i1", 0, "window_closed")],
        {Outcome.CLICK_BEFORE_IMPRESSION: 1},
    ),
    Case(
        "impression behind closed window is negative at once",
        [("i", "i2", 700), ("i", "i1", 0)],
        [("i1", 0, "window_closed")],
        {Outcome.IMPRESSION_AFTER_WINDOW: 1},
        pending=1,
    ),
    Case(
        "impression older than retention is dropped",
        [("i", "i2", 1300), ("i", "i1", 0), ("i", "i3", 60)],
        [("i3", 0, "window_closed")],
        {Outcome.IMPRESSION_EXPIRED: 1, Outcome.IMPRESSION_AFTER_WINDOW: 1},
        pending=1,
    ),
    Case(
        "forgotten impression makes click an orphan",
        [("i", "i1", 0), ("i", "i2", 1300), ("c", "i1", 100)],
        [("i1", 0, "window_closed")],
        {Outcome.CLICK_ORPHAN_EXPIRED: 1, Outcome.CLICK_LATE: 0},
    ),
    Case(
        "end of input flushes open windows",
        [("i", "i1", 0)],
        [("i1", 0, "window_closed")],
        pending=0,
        flush=True,
    ),
    Case(
        "every key expires scenario",
        [("i", "i1", 0), ("c", "i1", 10), ("c", "i1", 12), ("i", "i2", 700), ("i", "i9", 1400)],
        [("i1", 1, "click"), ("i2", 0, "window_closed")],
        {Outcome.CLICK_DUPLICATE: 1},
        pending=1,
    ),
    Case(
        "zero lateness closes at deadline",
        [("i", "i1", 0), ("i", "i2", 600)],
        [("i1", 0, "window_closed")],
        settings={"allowed_lateness_seconds": 0},
    ),
]


def run_case(machine: JoinStateMachine, case: Case, batch_size: int):
    events = build_events(case.events)
    examples, counts = [], {}
    batches = [events[i : i + batch_size] for i in range(0, len(events), batch_size)]
    for batch in batches:
        result = machine.process(0, batch)
        examples += result.examples
        for outcome, count in result.counts.items():
            counts[outcome] = counts.get(outcome, 0) + count
    if case.flush:
        result = machine.flush(0)
        examples += result.examples
    return examples, counts


@pytest.mark.parametrize("batch_size", [1, 100], ids=["one-by-one", "one-batch"])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_join_case(
    make_machine: Callable[..., JoinStateMachine], case: Case, batch_size: int
) -> None:
    machine = make_machine(**case.settings)

    examples, counts = run_case(machine, case, batch_size)

    emitted = [(e.impression.impression_id, e.label, e.label_source.value) for e in examples]
    assert emitted == case.expected
    for outcome, expected_count in case.counts.items():
        assert counts.get(outcome, 0) == expected_count, outcome
    if case.pending is not None:
        assert machine.store.pending_count(0) == case.pending


def test_positive_carries_delay_and_decision_time(make_machine) -> None:
    machine = make_machine()

    result = machine.process(0, build_events([("i", "i1", 100), ("c", "i1", 130.5)]))

    (positive,) = result.examples
    assert positive.label_delay_seconds == pytest.approx(30.5)
    assert positive.decided_at.timestamp() == pytest.approx(130.5)
    assert positive.impression.features == {"ad": "a"}


def test_negative_delay_is_window(make_machine) -> None:
    machine = make_machine()

    result = machine.process(0, build_events([("i", "i1", 100), ("i", "i2", 800)]))

    (negative,) = result.examples
    assert negative.label_delay_seconds == pytest.approx(600.0)
    assert negative.decided_at.timestamp() == pytest.approx(700.0)


def test_examples_reach_outbox_until_acknowledged(make_machine) -> None:
    machine = make_machine()

    result = machine.process(0, build_events([("i", "i1", 0), ("c", "i1", 1)]))

    assert machine.store.outbox(0) == result.examples
    machine.store.acknowledge(0, [e.dedup_key for e in result.examples])
    assert machine.store.outbox(0) == []


def test_redelivered_batch_emits_nothing_new(make_machine) -> None:
    machine = make_machine()
    events = build_events([("i", "i1", 0), ("c", "i1", 10), ("i", "i2", 20)])
    machine.process(0, events)

    again = machine.process(0, events)

    assert again.examples == []
    assert again.counts[JoinOutcome.IMPRESSION_DUPLICATE] == 2
    assert again.counts[JoinOutcome.CLICK_DUPLICATE] == 1


def test_redelivered_long_batch_emits_nothing_new(make_machine) -> None:
    # The batch spans more event time than window, lateness and retention
    # (600 + 60 + 600 s), so i1's record is forgotten by the time it is read again.
    machine = make_machine()
    spec = [("i", "i1", 0), ("c", "i1", 0)] + [("i", f"x{n}", 100.0 * n) for n in range(1, 20)]
    events = build_events(spec)
    first = machine.process(0, events)

    again = machine.process(0, events)

    assert ("i1", 1) in [(e.impression.impression_id, e.label) for e in first.examples]
    assert again.examples == []
    assert again.counts[JoinOutcome.IMPRESSION_EXPIRED] == 7
    assert again.counts[JoinOutcome.CLICK_ORPHAN_EXPIRED] == 1


def test_watermark_follows_max_event_time(make_machine) -> None:
    machine = make_machine()
    assert machine.watermark(0) is None

    machine.process(0, build_events([("i", "i1", 1000), ("i", "i2", 900)]))

    assert machine.watermark(0) == 940.0


def test_event_offsets_mark_examples_released_before_each_event(make_machine) -> None:
    machine = make_machine(allowed_lateness_seconds=0)
    machine.process(0, build_events([("i", "i1", 0)]))

    result = machine.process(
        0, build_events([("i", "i2", 600), ("c", "i2", 601), ("i", "i3", 1200)])
    )

    emitted = [(e.impression.impression_id, e.label) for e in result.examples]
    assert emitted == [("i1", 0), ("i2", 1)]
    assert result.event_offsets == [1, 1, 2]


def test_served_notice_precedes_label(make_machine) -> None:
    machine = make_machine(emit_served=True)
    events = build_events([("c", "i2", 5), ("i", "i1", 0), ("i", "i2", 1), ("c", "i1", 30)])

    result = machine.process(0, events)
    again = machine.process(0, events)

    emitted = [(e.impression.impression_id, e.label_source.value, e.label) for e in result.examples]
    assert emitted == [
        ("i1", "served", 0),
        ("i2", "served", 0),
        ("i2", "click", 1),
        ("i1", "click", 1),
    ]
    assert again.examples == []


def test_served_notice_off_by_default(make_machine) -> None:
    machine = make_machine()

    result = machine.process(0, build_events([("i", "i1", 0), ("c", "i1", 30)]))

    assert [e.label_source.value for e in result.examples] == ["click"]
