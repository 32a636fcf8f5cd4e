"""Tests of the Taobao UserBehavior importer on small CSV files written by each test."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from shared.events import Click, Impression
from shared.streams.recorded import read_events
from shared.streams.taobao import (
    DATASET_END,
    DATASET_START,
    MAX_BAD_ROW_EXAMPLES,
    TaobaoFormatError,
    TaobaoReport,
    import_taobao,
    iter_taobao,
)

T0 = 1511658000  # 2017-11-26 01:00:00 UTC


def write_csv(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "UserBehavior.csv"
    path.write_text("".join(line + "\n" for line in lines))
    return path


def utc(seconds: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def run(path: Path, **options) -> tuple[list[Impression | Click], TaobaoReport]:
    report = TaobaoReport()
    events = list(iter_taobao(path, report=report, **options))
    return events, report


def test_pv_then_buy_gives_delayed_click(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [f"1,100,7,pv,{T0}", f"1,100,7,buy,{T0 + 512}"])

    events, report = run(path)

    impression, click = events
    assert isinstance(impression, Impression)
    assert impression.impression_id == f"tb-1-100-{T0}-1"
    assert impression.event_time == utc(T0)
    assert impression.user_id == "1"
    assert impression.item_id == "100"
    assert impression.features == {"user_id": "1", "category_id": "7"}
    assert isinstance(click, Click)
    assert click.impression_id == impression.impression_id
    assert click.ts - impression.ts == 512
    assert report.impressions == 1
    assert report.clicks == 1


def test_buy_without_pv_gives_no_click(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path, [f"1,100,7,buy,{T0}", f"2,100,7,pv,{T0 + 1}", f"1,101,7,pv,{T0 + 2}"]
    )

    events, report = run(path)

    assert all(isinstance(event, Impression) for event in events)
    assert len(events) == 2
    assert report.labels_without_impression == 1
    assert report.clicks == 0


def test_buy_before_its_pv_gives_no_click(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [f"1,100,7,buy,{T0}", f"1,100,7,pv,{T0 + 60}"])

    events, report = run(path)

    assert [type(event) for event in events] == [Impression]
    assert report.labels_without_impression == 1


def test_cart_counts_only_with_option(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path, [f"1,100,7,pv,{T0}", f"1,100,7,cart,{T0 + 30}", f"1,100,7,fav,{T0 + 40}"]
    )

    buy_only, buy_only_report = run(path)
    with_cart, with_cart_report = run(path, label_behaviors=("buy", "cart"))

    assert [type(event) for event in buy_only] == [Impression]
    assert buy_only_report.ignored_rows == 2
    assert [type(event) for event in with_cart] == [Impression, Click]
    assert with_cart[1].ts - with_cart[0].ts == 30
    assert with_cart_report.ignored_rows == 1


def test_cart_then_buy_gives_one_click(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path, [f"1,100,7,pv,{T0}", f"1,100,7,cart,{T0 + 30}", f"1,100,7,buy,{T0 + 90}"]
    )

    events, report = run(path, label_behaviors=("buy", "cart"))

    assert [type(event) for event in events] == [Impression, Click]
    assert events[1].ts - events[0].ts == 30
    assert report.repeated_labels == 1


def test_click_goes_to_most_recent_pv(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [f"1,100,7,pv,{T0}", f"1,100,7,pv,{T0 + 100}", f"1,100,7,buy,{T0 + 160}"],
    )

    events, _ = run(path)

    click = events[-1]
    assert isinstance(click, Click)
    assert click.impression_id == f"tb-1-100-{T0 + 100}-2"


def test_new_pv_gets_own_click(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            f"1,100,7,pv,{T0}",
            f"1,100,7,buy,{T0 + 10}",
            f"1,100,7,buy,{T0 + 20}",
            f"1,100,7,pv,{T0 + 30}",
            f"1,100,7,buy,{T0 + 40}",
        ],
    )

    events, report = run(path)

    clicks = [event for event in events if isinstance(event, Click)]
    assert [click.impression_id for click in clicks] == [
        f"tb-1-100-{T0}-1",
        f"tb-1-100-{T0 + 30}-4",
    ]
    assert report.repeated_labels == 1


def test_unsorted_input_is_sorted(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            f"2,200,8,pv,{T0 + 50}",
            f"1,100,7,buy,{T0 + 70}",
            f"1,100,7,pv,{T0}",
            f"3,300,9,pv,{T0 + 20}",
        ],
    )

    events, _ = run(path)

    times = [event.ts for event in events]
    assert times == sorted(times)
    assert [event.impression_id for event in events] == [
        f"tb-1-100-{T0}-3",
        f"tb-3-300-{T0 + 20}-4",
        f"tb-2-200-{T0 + 50}-1",
        f"tb-1-100-{T0}-3",
    ]
    assert isinstance(events[-1], Click)


def test_same_second_puts_impressions_first(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [f"1,100,7,buy,{T0}", f"1,100,7,pv,{T0}", f"2,200,8,pv,{T0}"])

    events, _ = run(path)

    assert [type(event) for event in events] == [Impression, Impression, Click]
    assert events[2].impression_id == f"tb-1-100-{T0}-2"
    assert events[2].event_time == events[0].event_time


def test_bad_rows_reported_with_line_numbers(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            f"1,100,7,pv,{T0}",
            "1,100,7,pv",
            f"1,abc,7,pv,{T0}",
            f"1,100,7,click,{T0}",
            "1,100,7,pv,soon",
            f"1,100,7,pv,{T0 + 1}",
        ],
    )

    events, report = run(path)

    assert len(events) == 2
    assert report.rows_read == 6
    assert report.bad_rows == 4
    lines = [(row.line_number, row.reason) for row in report.bad_row_examples]
    assert lines == [
        (2, "has 4 fields, expected 5"),
        (3, "item_id 'abc' is not a non-negative integer"),
        (4, "behavior 'click' is not one of pv, cart, fav, buy"),
        (5, "timestamp 'soon' is not Unix seconds"),
    ]
    assert report.bad_row_examples[0].text == "1,100,7,pv"


def test_bad_row_examples_are_capped(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["junk"] * (MAX_BAD_ROW_EXAMPLES + 5))

    _, report = run(path)

    assert report.bad_rows == MAX_BAD_ROW_EXAMPLES + 5
    assert len(report.bad_row_examples) == MAX_BAD_ROW_EXAMPLES


def test_too_many_bad_rows_raise(tmp_path: Path) -> None:
    path = write_csv(tmp_path, ["junk", "junk", "junk", f"1,100,7,pv,{T0}"])

    with pytest.raises(TaobaoFormatError, match="more than 2 bad rows; the first is line 1"):
        run(path, max_bad_rows=2)


def test_rows_outside_range_dropped(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            "1,100,7,pv,1505117799",  # 2017-09-11, a known bad row of the real data
            f"1,100,7,pv,{int(DATASET_START.timestamp())}",
            f"1,101,7,pv,{int(DATASET_END.timestamp()) - 1}",
            f"1,102,7,pv,{int(DATASET_END.timestamp())}",
        ],
    )

    events, report = run(path, start=DATASET_START, end=DATASET_END)

    assert [event.item_id for event in events] == ["100", "101"]
    assert report.rows_outside_range == 2


def test_dataset_range_is_china_standard_time() -> None:
    assert DATASET_START == dt.datetime(2017, 11, 24, 16, tzinfo=dt.UTC)
    assert DATASET_END == dt.datetime(2017, 12, 3, 16, tzinfo=dt.UTC)


def test_presorted_matches_default(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        [
            f"1,100,7,pv,{T0}",
            f"1,100,7,buy,{T0 + 5}",
            f"2,100,7,buy,{T0 + 5}",
            f"2,100,7,pv,{T0 + 5}",
        ],
    )

    default, _ = run(path)
    presorted, _ = run(path, presorted=True)

    assert presorted == default
    assert [type(event) for event in presorted] == [Impression, Impression, Click, Click]


def test_presorted_rejects_unsorted_input(tmp_path: Path) -> None:
    path = write_csv(tmp_path, [f"1,100,7,pv,{T0 + 10}", f"1,101,7,pv,{T0}"])

    with pytest.raises(TaobaoFormatError, match="line 2: timestamp .* earlier .* presorted=True"):
        run(path, presorted=True)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"label_behaviors": ()}, "label_behaviors is empty"),
        ({"label_behaviors": ("pv",)}, "label behavior 'pv' is invalid"),
        ({"start": dt.datetime(2017, 11, 25)}, "has no time zone"),
        ({"start": DATASET_END, "end": DATASET_START}, "must be earlier than end"),
    ],
)
def test_invalid_options_raise(tmp_path: Path, options: dict, message: str) -> None:
    path = write_csv(tmp_path, [f"1,100,7,pv,{T0}"])

    with pytest.raises(TaobaoFormatError, match=message):
        iter_taobao(path, **options)


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(TaobaoFormatError, match=r"missing\.csv' not found"):
        iter_taobao(tmp_path / "missing.csv")


def test_import_writes_stream_and_summary(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path,
        ["1,100,7,pv,1505117799", f"1,100,7,buy,{T0 + 600}", f"1,100,7,pv,{T0}", "bad"],
    )
    out = tmp_path / "taobao.jsonl"

    summary = import_taobao(path, out, start=DATASET_START, end=DATASET_END)

    assert [event.type for event in read_events(out)] == ["impression", "click"]
    assert summary.impressions == 1
    assert summary.clicks == 1
    assert summary.span_seconds == 600
    assert summary.bytes_written == out.stat().st_size
    assert summary.details["rows_read"] == 4
    assert summary.details["bad_rows"] == 1
    assert summary.details["rows_outside_range"] == 1
