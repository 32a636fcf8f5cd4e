"""Tests of the Open Bandit Dataset importer on small files with the real column layout."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import pytest

from shared.events import Click, Impression
from shared.streams.obd import ObdFormatError, flat_item_context_filename, import_obd, iter_obd
from shared.streams.recorded import read_events

ITEMS_PER_CAMPAIGN = {"all": 3, "men": 2, "women": 2}


def item_context_rows(policy: str, campaign: str) -> list[list[str]]:
    """Item context rows whose numeric feature differs by policy, as in the real files."""
    offset = 0.5 if policy == "bts" else 0.0
    return [
        [
            str(item),
            str(item),
            str(item / 10 + offset),
            f"{campaign}-hash1-{item}",
            "hash2",
            "hash3",
        ]
        for item in range(ITEMS_PER_CAMPAIGN[campaign])
    ]


def write_item_context(
    folder: Path, policy: str, campaign: str, rows: list[list[str]] | None = None
) -> None:
    header = ["", "item_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"]
    with open(folder / flat_item_context_filename(campaign), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows if rows is not None else item_context_rows(policy, campaign))


def log_header(campaign: str) -> list[str]:
    return [
        "",
        "timestamp",
        "item_id",
        "position",
        "click",
        "propensity_score",
        "user_feature_0",
        "user_feature_1",
        "user_feature_2",
        "user_feature_3",
        *(f"user-item_affinity_{item}" for item in range(ITEMS_PER_CAMPAIGN[campaign])),
    ]


def log_row(
    index: int, timestamp: str, item_id: int, position: int, click: int, campaign: str
) -> list[str]:
    affinities = ["0.0"] * ITEMS_PER_CAMPAIGN[campaign]
    affinities[item_id] = f"{item_id + 1}.5"
    return [
        str(index),
        timestamp,
        str(item_id),
        str(position),
        str(click),
        "0.0125",
        "uf0",
        "uf1",
        "uf2",
        f"uf3-{index}",
        *affinities,
    ]


def write_log(
    folder: Path, campaign: str, rows: list[list[str]], header: list[str] | None = None
) -> None:
    with open(folder / f"{campaign}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header if header is not None else log_header(campaign))
        writer.writerows(rows)


def write_dataset(root: Path) -> Path:
    """Write both policies and all three campaigns, each with three rows sorted by time."""
    minute = {"random": 0, "bts": 1}
    second = {"all": 0, "men": 10, "women": 20}
    for policy in ("random", "bts"):
        folder = root / policy
        folder.mkdir(parents=True)
        for campaign in ("all", "men", "women"):
            write_item_context(folder, policy, campaign)
            rows = [
                log_row(
                    index,
                    f"2019-11-24 0{hour}:0{minute[policy]}:{second[campaign]:02d}.000001+00:00",
                    item_id=index % ITEMS_PER_CAMPAIGN[campaign],
                    position=index + 1,
                    click=1 if index == 1 else 0,
                    campaign=campaign,
                )
                for index, hour in enumerate((0, 1, 2))
            ]
            write_log(folder, campaign, rows)
    return root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "open_bandit_dataset")


def test_single_file_impressions_and_clicks(dataset: Path) -> None:
    events = list(iter_obd(dataset, policies=("random",), campaigns=("men",)))

    assert [type(event) for event in events] == [Impression, Impression, Click, Impression]
    first = events[0]
    assert first.impression_id == "obd-random-men-0"
    assert first.event_time == dt.datetime(2019, 11, 24, 0, 0, 10, 1, tzinfo=dt.UTC)
    assert first.user_id is None
    assert first.item_id == "men-0"
    assert first.features == {
        "position": "1",
        "user_feature_0": "uf0",
        "user_feature_1": "uf1",
        "user_feature_2": "uf2",
        "user_feature_3": "uf3-0",
        "item_feature_0": 0.0,
        "item_feature_1": "men-hash1-0",
        "item_feature_2": "hash2",
        "item_feature_3": "hash3",
        "user_item_affinity": 1.5,
        "campaign": "men",
        "policy": "random",
    }


def test_click_follows_impression_at_same_time(dataset: Path) -> None:
    events = list(iter_obd(dataset, policies=("random",), campaigns=("all",)))

    clicked_impression, click = events[1], events[2]
    assert isinstance(click, Click)
    assert click.impression_id == clicked_impression.impression_id == "obd-random-all-1"
    assert click.event_time == clicked_impression.event_time


def test_affinity_is_the_shown_items_column(dataset: Path) -> None:
    events = [
        event for event in iter_obd(dataset, ("random",), ("all",)) if isinstance(event, Impression)
    ]

    assert [event.item_id for event in events] == ["all-0", "all-1", "all-2"]
    assert [event.features["user_item_affinity"] for event in events] == [1.5, 2.5, 3.5]


def test_item_context_comes_from_own_policy(dataset: Path) -> None:
    random_first = next(iter_obd(dataset, ("random",), ("all",)))
    bts_first = next(iter_obd(dataset, ("bts",), ("all",)))

    assert random_first.features["item_feature_0"] == 0.0
    assert bts_first.features["item_feature_0"] == 0.5


def test_all_files_merged_in_time_order(dataset: Path) -> None:
    events = list(iter_obd(dataset))

    impressions = [event for event in events if isinstance(event, Impression)]
    clicks = [event for event in events if isinstance(event, Click)]
    assert len(impressions) == 18
    assert len(clicks) == 6
    times = [event.event_time for event in events]
    assert times == sorted(times)
    assert [event.impression_id for event in impressions[:6]] == [
        "obd-random-all-0",
        "obd-random-men-0",
        "obd-random-women-0",
        "obd-bts-all-0",
        "obd-bts-men-0",
        "obd-bts-women-0",
    ]
    for position, event in enumerate(events):
        if isinstance(event, Click):
            assert events[position - 1].impression_id == event.impression_id


def test_equal_times_keep_file_order(tmp_path: Path) -> None:
    root = tmp_path / "obd"
    for policy in ("random", "bts"):
        folder = root / policy
        folder.mkdir(parents=True)
        for campaign in ("all", "men"):
            write_item_context(folder, policy, campaign)
            write_log(
                folder, campaign, [log_row(0, "2019-11-24 00:00:00+00:00", 0, 1, 0, campaign)]
            )

    events = list(iter_obd(root, policies=("random", "bts"), campaigns=("all", "men")))

    assert [event.impression_id for event in events] == [
        "obd-random-all-0",
        "obd-random-men-0",
        "obd-bts-all-0",
        "obd-bts-men-0",
    ]


def test_import_writes_stream_and_summary(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "obd.jsonl.gz"

    summary = import_obd(dataset, out)

    assert out.read_bytes()[:2] == b"\x1f\x8b"
    assert list(read_events(out)) == list(iter_obd(dataset))
    assert summary.impressions == 18
    assert summary.clicks == 6
    assert summary.click_rate == pytest.approx(6 / 18)
    assert summary.bytes_written == out.stat().st_size
    assert summary.first_event_time == dt.datetime(2019, 11, 24, 0, 0, 0, 1, tzinfo=dt.UTC)
    assert summary.last_event_time == dt.datetime(2019, 11, 24, 2, 1, 20, 1, tzinfo=dt.UTC)
    assert summary.span_seconds == pytest.approx(2 * 3600 + 80)
    assert str(summary).splitlines() == [
        f"wrote {out}: {out.stat().st_size:,} bytes",
        "impressions 18, clicks 6, click rate 33.3333%",
        "events from 2019-11-24T00:00:00.000001+00:00 to 2019-11-24T02:01:20.000001+00:00"
        " (7,280 s)",
    ]


def test_missing_log_file_names_both_layouts(dataset: Path) -> None:
    (dataset / "bts" / "women.csv").unlink()

    with pytest.raises(
        ObdFormatError, match=r"not found at '.*bts/women/women\.csv' or '.*bts/women\.csv'"
    ):
        iter_obd(dataset)


def test_nested_layout_matches_flat(dataset: Path, tmp_path: Path) -> None:
    nested_root = tmp_path / "nested"
    for policy in ("random", "bts"):
        for campaign in ("all", "men", "women"):
            folder = nested_root / policy / campaign
            folder.mkdir(parents=True)
            (folder / f"{campaign}.csv").write_bytes(
                (dataset / policy / f"{campaign}.csv").read_bytes()
            )
            context = dataset / policy / flat_item_context_filename(campaign)
            (folder / "item_context.csv").write_bytes(context.read_bytes())

    assert list(iter_obd(nested_root)) == list(iter_obd(dataset))


def test_nested_layout_needs_own_item_context(dataset: Path) -> None:
    folder = dataset / "random" / "men"
    folder.mkdir()
    (folder / "men.csv").write_bytes((dataset / "random" / "men.csv").read_bytes())

    with pytest.raises(ObdFormatError, match=r"random/men/item_context\.csv' not found"):
        iter_obd(dataset)


def test_missing_item_context_names_path(dataset: Path) -> None:
    (dataset / "random" / "item_context_men.csv").unlink()

    with pytest.raises(ObdFormatError, match=r"random/item_context_men\.csv.*not found"):
        iter_obd(dataset)


def test_missing_root_folder(tmp_path: Path) -> None:
    with pytest.raises(ObdFormatError, match=r"folder .*nowhere.* not found; point --source"):
        iter_obd(tmp_path / "nowhere")


def test_missing_log_column_names_column(dataset: Path) -> None:
    header = [column for column in log_header("men") if column != "user_feature_2"]
    folder = dataset / "random"
    write_log(folder, "men", [], header=header)

    with pytest.raises(ObdFormatError, match=r"random/men\.csv.*no column 'user_feature_2'"):
        iter_obd(dataset)


def test_missing_affinity_column_names_column(dataset: Path) -> None:
    header = log_header("men")[:-1]
    write_log(dataset / "bts", "men", [], header=header)

    with pytest.raises(ObdFormatError, match=r"no column 'user-item_affinity_1'"):
        iter_obd(dataset)


def test_missing_item_context_column(dataset: Path) -> None:
    path = dataset / "random" / "item_context.csv"
    path.write_text(",item_id,item_feature_0,item_feature_1,item_feature_2\n0,0,0.1,a,b\n")

    with pytest.raises(ObdFormatError, match=r"item_context\.csv.*no column 'item_feature_3'"):
        iter_obd(dataset)


def test_missing_row_index_column(dataset: Path) -> None:
    write_log(dataset / "random", "all", [], header=log_header("all")[1:])

    with pytest.raises(ObdFormatError, match=r"all\.csv' has no unnamed row-index column"):
        iter_obd(dataset)


def test_errors_raise_before_writing(dataset: Path, tmp_path: Path) -> None:
    (dataset / "bts" / "all.csv").unlink()
    out = tmp_path / "never.jsonl.gz"

    with pytest.raises(ObdFormatError):
        import_obd(dataset, out)
    assert not out.exists()


def test_unsorted_file_raises_with_line(dataset: Path) -> None:
    rows = [
        log_row(0, "2019-11-24 01:00:00+00:00", 0, 1, 0, "all"),
        log_row(1, "2019-11-24 00:30:00+00:00", 1, 2, 0, "all"),
    ]
    write_log(dataset / "random", "all", rows)

    with pytest.raises(ObdFormatError, match=r"random/all\.csv' line 3: timestamp .* earlier"):
        list(iter_obd(dataset, ("random",), ("all",)))


def test_rows_are_read_lazily(dataset: Path) -> None:
    rows = [
        log_row(0, "2019-11-24 00:00:00+00:00", 0, 1, 0, "all"),
        log_row(1, "not a time", 1, 2, 0, "all"),
    ]
    write_log(dataset / "random", "all", rows)
    events = iter_obd(dataset, ("random",), ("all",))

    assert next(events).impression_id == "obd-random-all-0"
    with pytest.raises(ObdFormatError, match=r"line 3, column 'timestamp': 'not a time'"):
        next(events)


def test_invalid_click_flag_raises(dataset: Path) -> None:
    row = log_row(0, "2019-11-24 00:00:00+00:00", 0, 1, 0, "all")
    row[4] = "yes"
    write_log(dataset / "random", "all", [row])

    with pytest.raises(ObdFormatError, match=r"column 'click': 'yes' is not 0 or 1"):
        list(iter_obd(dataset, ("random",), ("all",)))


def test_unknown_item_raises(dataset: Path) -> None:
    write_item_context(dataset / "random", "random", "all", item_context_rows("random", "all")[:1])
    row = log_row(0, "2019-11-24 00:00:00+00:00", 2, 1, 0, "all")
    write_log(dataset / "random", "all", [row])

    with pytest.raises(ObdFormatError, match=r"item '2' is not listed in"):
        list(iter_obd(dataset, ("random",), ("all",)))


def test_timestamp_without_offset_raises(dataset: Path) -> None:
    write_log(dataset / "random", "all", [log_row(0, "2019-11-24 00:00:00", 0, 1, 0, "all")])

    with pytest.raises(ObdFormatError, match="with a UTC offset"):
        list(iter_obd(dataset, ("random",), ("all",)))


def test_non_numeric_item_feature_raises(dataset: Path) -> None:
    rows = item_context_rows("random", "all")
    rows[1][2] = "abc"
    write_item_context(dataset / "random", "random", "all", rows)

    with pytest.raises(
        ObdFormatError, match=r"line 3, column 'item_feature_0': 'abc' is not a finite"
    ):
        iter_obd(dataset)


@pytest.mark.parametrize(
    ("policies", "campaigns", "message"),
    [
        (("greedy",), ("all",), "unknown policy 'greedy'"),
        (("random",), ("kids",), "unknown campaign 'kids'"),
        ((), ("all",), "at least one policy"),
    ],
)
def test_invalid_selection_raises(dataset: Path, policies, campaigns, message: str) -> None:
    with pytest.raises(ObdFormatError, match=message):
        iter_obd(dataset, policies, campaigns)


def test_short_row_raises(dataset: Path) -> None:
    row = log_row(0, "2019-11-24 00:00:00+00:00", 0, 1, 0, "all")[:-1]
    write_log(dataset / "random", "all", [row])

    with pytest.raises(ObdFormatError, match=r"line 2 has a different number of fields"):
        list(iter_obd(dataset, ("random",), ("all",)))


def test_non_integer_row_index_raises(dataset: Path) -> None:
    row = log_row(0, "2019-11-24 00:00:00+00:00", 0, 1, 0, "all")
    row[0] = "first"
    write_log(dataset / "random", "all", [row])

    with pytest.raises(ObdFormatError, match=r"row index 'first' is not an integer"):
        list(iter_obd(dataset, ("random",), ("all",)))
