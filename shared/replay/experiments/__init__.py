"""Experiments on a replay, each answering one question that comes before a deployment.

Every module that ``sections()`` returns has the same four names, which the console
summary and the HTML report call in that order:

- ``NAME``: the key of its numbers in ``metrics.json`` under ``experiments``;
- ``summary_lines(result)``: console lines, empty when the experiment did not run;
- ``html_section(result, directory)``: an HTML section whose tables and plots
  have captions that explain how to read them. It writes its plots into
  ``directory`` and returns "" when the experiment did not run;
- ``document(result)``: its numbers for ``metrics.json``, or None.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from shared.replay.runner import ReplayResult


class Section(Protocol):
    """The interface of an experiment module, as the summary and the report call it."""

    NAME: str

    def summary_lines(self, result: ReplayResult) -> list[str]: ...

    def html_section(self, result: ReplayResult, directory: Path) -> str: ...

    def document(self, result: ReplayResult) -> dict[str, Any] | None: ...


def sections() -> tuple[Section, ...]:
    """Return the experiment modules in report order."""
    # Imported here because each module imports the runner, which imports this package.
    from shared.replay.experiments import (
        comparison,
        freshness,
        selection,
        slices,
        verdicts,
        windows,
    )

    return (verdicts, comparison, selection, slices, freshness, windows)
