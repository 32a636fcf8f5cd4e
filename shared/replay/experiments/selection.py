"""Online model selection: which candidate did a selection model pick, and what did each learn?

An arm whose registry model is a selection model (``select``) races several
candidates inside one model. This section lists, per such arm, each
candidate's examples learned, its share of all candidate updates, its running
metric, when it was dropped, and which candidate makes the predictions now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.learn.selection import CandidateReport, Rung, find_selector
from shared.replay.report import _cell, _escape, _table
from shared.replay.runner import ReplayResult
from shared.replay.summary import NOT_AVAILABLE, format_count

NAME = "model_selection"

_METRIC_DECIMALS = 5


@dataclass(frozen=True)
class ArmSelection:
    """The choices of the selection model in one arm."""

    arm: str
    model: str
    learn_calls: int
    # The class name of the River metric the race is decided by, e.g. LogLoss.
    metric: str
    # In the selector's candidate order, so a rung's indices point into it.
    candidates: list[CandidateReport]
    rungs: list[Rung]

    @property
    def best(self) -> str:
        """The name of the candidate that makes the predictions now."""
        return next(candidate.name for candidate in self.candidates if candidate.best)

    @property
    def updates(self) -> int:
        """Candidate updates summed over candidates: the cost of the race in learn steps."""
        return sum(candidate.examples_learned for candidate in self.candidates)

    @property
    def race_finished_after(self) -> int | None:
        """The learn calls after which one candidate was left, or None while several race."""
        racing = [candidate for candidate in self.candidates if candidate.status != "eliminated"]
        if len(racing) > 1 or not self.rungs:
            return None
        return self.rungs[-1].learn_calls


def selections(result: ReplayResult) -> list[ArmSelection]:
    """Return the choices of every arm whose model contains a selection model, in arm order."""
    found = []
    for arm in result.arms:
        selector = find_selector(arm.learner.model)
        if selector is None:
            continue
        found.append(
            ArmSelection(
                arm=arm.name,
                model=arm.spec.model,
                learn_calls=selector.learn_calls,
                metric=type(selector.metric).__name__,
                candidates=selector.candidates(),
                rungs=list(selector.rungs),
            )
        )
    return found


def _share(selection: ArmSelection, candidate: CandidateReport) -> str:
    if not selection.updates:
        return NOT_AVAILABLE
    return f"{candidate.examples_learned / selection.updates * 100:.1f} %"


def _format_metric(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{value:.{_METRIC_DECIMALS}f}"


def _status(candidate: CandidateReport) -> str:
    if candidate.status == "racing" and candidate.best:
        return "racing, predicting"
    return candidate.status


def _rung_header(rung: Rung) -> str:
    return f"at {rung.learn_calls:,} calls"


def _rung_cell(rung: Rung, index: int) -> str:
    """Format a candidate's metric at a rung, marked if dropped there, or "" if it was out."""
    if index not in rung.metric_values:
        return ""
    value = _format_metric(rung.metric_values[index])
    return f"{value} dropped" if index in rung.dropped else value


def _race_text(selection: ArmSelection) -> str:
    finished_after = selection.race_finished_after
    if finished_after is None:
        return "the race is still on"
    return f"one candidate left after {finished_after:,}"


def _heading(selection: ArmSelection) -> tuple[str, str]:
    """Return the heading's title and its details."""
    return (
        f"Model selection in arm {selection.arm}: successive halving by {selection.metric}",
        f"{selection.learn_calls:,} learn calls, {_race_text(selection)}, "
        f"predicting with {selection.best}",
    )


# Console summary.


def summary_lines(result: ReplayResult) -> list[str]:
    """Return each selection model's candidates for the console, or [] when no arm has one."""
    lines: list[str] = []
    for selection in selections(result):
        name_width = max(12, *(len(candidate.name) + 2 for candidate in selection.candidates))
        title, details = _heading(selection)
        lines += [title, f"  {details}"]
        lines.append(
            "  "
            + "candidate".ljust(name_width)
            + "status".ljust(20)
            + "examples".rjust(10)
            + "share".rjust(8)
            + "metric".rjust(10)
            + "".join(_rung_header(rung).rjust(17) for rung in selection.rungs)
        )
        for index, candidate in enumerate(selection.candidates):
            line = (
                "  "
                + candidate.name.ljust(name_width)
                + _status(candidate).ljust(20)
                + format_count(candidate.examples_learned).rjust(10)
                + _share(selection, candidate).rjust(8)
                + _format_metric(candidate.metric_value).rjust(10)
                + "".join(_rung_cell(rung, index).rjust(17) for rung in selection.rungs)
            )
            # A candidate dropped at an early rung has empty cells at the end.
            lines.append(line.rstrip())
    if lines:
        lines.append(
            "  metric: the selector's running value over the examples each candidate learned"
        )
    return lines


# HTML report.


def html_section(result: ReplayResult, directory: Path) -> str:
    """Return a table per selection model, or "" when no arm has one."""
    found = selections(result)
    if not found:
        return ""
    parts = ["<h2>Online model selection</h2>"]
    for selection in found:
        headers = [
            "candidate",
            "status",
            "examples learned",
            "share of updates",
            f"running {selection.metric}",
            *(f"{selection.metric} {_rung_header(rung)}" for rung in selection.rungs),
        ]
        rows = []
        for index, candidate in enumerate(selection.candidates):
            cells = [
                _cell(candidate.name, number=False),
                _cell(_status(candidate), number=False),
                _cell(format_count(candidate.examples_learned)),
                _cell(_share(selection, candidate)),
                _cell(_format_metric(candidate.metric_value)),
                *(_cell(_rung_cell(rung, index)) for rung in selection.rungs),
            ]
            rows.append(f"<tr>{''.join(cells)}</tr>")
        heading = ". ".join(_heading(selection))
        parts.append(f"<h3>{_escape(selection.arm)}</h3>")
        parts.append(f'<p class="note">{_escape(heading)}.</p>')
        parts.append(_table(headers, rows))
    parts.append(f'<p class="note">{_escape(_CAPTION)}</p>')
    return "".join(parts)


_CAPTION = (
    "Successive halving trains every candidate still in the race on each example. At each "
    "rung it drops the worse half by running metric, until one candidate is left, which then "
    "learns alone. The registry's select model races by log loss, lower is better. Examples "
    "learned counts the learn calls each candidate took part in, and the share is its part "
    "of all candidate updates, the cost of the race. The running metric is the selector's "
    "own: each candidate's prediction just before it learned an example, over the examples "
    "it learned. The rung columns show where every candidate in the race stood at each cut, "
    "which is what decided it. A dropped candidate's metric stops there, while the others go "
    "on to later examples, so compare candidates within a rung column. Under fake-negative "
    "calibration the selector learns each impression as a negative and each click as an "
    "extra positive, so the metric is on that training stream and not on served scores. "
    "River predicts with the candidate whose running metric last beat the others."
)


# metrics.json.


def document(result: ReplayResult) -> dict[str, Any] | None:
    """Return every selection model's choices for metrics.json, or None when no arm has one."""
    found = selections(result)
    if not found:
        return None
    return {
        selection.arm: {
            "model": selection.model,
            "learn_calls": selection.learn_calls,
            "race_finished_after": selection.race_finished_after,
            "rungs": [
                {
                    "learn_calls": rung.learn_calls,
                    "metric_values": {
                        selection.candidates[index].name: value
                        for index, value in rung.metric_values.items()
                    },
                    "dropped": [selection.candidates[index].name for index in rung.dropped],
                }
                for rung in selection.rungs
            ],
            "metric": selection.metric,
            "predicting": selection.best,
            "candidates": [
                {
                    "name": candidate.name,
                    "status": candidate.status,
                    "examples_learned": candidate.examples_learned,
                    "running_metric": candidate.metric_value,
                    "eliminated_after": candidate.eliminated_after,
                }
                for candidate in selection.candidates
            ],
        }
        for selection in found
    }
