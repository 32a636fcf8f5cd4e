"""Read and write recorded streams: JSON Lines, optionally gzip-compressed.

Each line is one impression or click, tagged by its ``type`` field, in the
same encoding as Kafka message values. ``docs/stream-format.md`` is the
format's reference.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from shared.errors import InvalidEventError
from shared.events import Click, Impression, encode, parse_event

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class InvalidLine:
    """A line of a recorded stream that failed validation."""

    line_number: int
    raw: bytes
    error: InvalidEventError


# How many lines pass between two progress callbacks.
_PROGRESS_EVERY_LINES = 2048


def read_lines(
    path: str | Path, on_progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw_line)`` for each non-blank line, lazily.

    ``on_progress`` receives the number of file bytes read so far (compressed
    bytes for gzip), for progress bars.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"recorded stream {str(path)!r} not found; pass an existing .jsonl or .jsonl.gz file"
        )
    with open(path, "rb") as file_handle:
        handle: IO[bytes] = file_handle
        if file_handle.read(2) == _GZIP_MAGIC:
            handle = gzip.GzipFile(fileobj=file_handle, mode="rb")
        file_handle.seek(0)
        for line_number, line in enumerate(handle, start=1):
            if on_progress is not None and line_number % _PROGRESS_EVERY_LINES == 0:
                on_progress(file_handle.tell())
            line = line.strip()
            if line:
                yield line_number, line
        if on_progress is not None:
            on_progress(file_handle.tell())


def read_events(
    path: str | Path,
    invalid: list[InvalidLine] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> Iterator[Impression | Click]:
    """Yield the events of a recorded stream in file order, lazily.

    Invalid lines are skipped and appended to ``invalid`` when it is given, so
    one bad line never stops a replay. Without ``invalid`` they raise.
    """
    for line_number, raw in read_lines(path, on_progress):
        try:
            yield parse_event(raw)
        except InvalidEventError as error:
            if invalid is None:
                raise InvalidEventError(
                    f"line {line_number}: {error.field}",
                    error.value,
                    error.rule,
                    hint=f"fix line {line_number} of {path} or regenerate the file",
                    code=error.code,
                ) from None
            logger.debug("Skipping invalid line %d of %s: %s", line_number, path, error)
            invalid.append(InvalidLine(line_number, raw, error))


def write_events(path: str | Path, events: Iterable[Impression | Click]) -> int:
    """Write events as JSON Lines, gzip-compressed when ``path`` ends in ``.gz``.

    Returns the number of events written. The gzip header carries no
    timestamp, so the same events always give the same bytes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "wb") as file_handle:
        handle: IO[bytes] = file_handle
        if path.suffix == ".gz":
            handle = gzip.GzipFile(fileobj=file_handle, mode="wb", mtime=0, filename="")
        for event in events:
            handle.write(encode(event))
            handle.write(b"\n")
            count += 1
        handle.close()
    return count
