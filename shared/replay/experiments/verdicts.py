"""Success targets: did each model reach the metric values a team deploys by?

Each continuous arm, the main model and every compared model, is judged on
its served-score metrics over all evaluated examples. With a time holdout
those are only the examples served at or after ``holdout_from``, because the
replay evaluates nothing earlier. The frozen and retrained copies of the
freshness experiment are left out: they answer a different question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.replay.arms import ReplayArm
from shared.replay.report import _cell, _escape, _table
from shared.replay.runner import ReplayResult
from shared.replay.summary import format_event_time
from shared.replay.targets import TargetVerdict

NAME = "targets"

_RESULT_WORDS = {True: "met", False: "missed", None: "not measurable"}


@dataclass(frozen=True, slots=True)
class ArmVerdicts:
    """One arm's served-score metrics and its verdict on every target."""

    arm: str
    model: str
    report: dict[str, Any]
    verdicts: list[TargetVerdict]


def judged_arms(result: ReplayResult) -> list[ArmVerdicts]:
    """Judge every continuous arm against every target, the main model first."""
    targets = result.config.targets
    judged = []
    for arm in _continuous_arms(result):
        report = arm.learner.evaluation.served["model"].report().as_dict()
        judged.append(
            ArmVerdicts(
                arm=arm.name,
                model=arm.spec.model,
                report=report,
                verdicts=[target.judge(report) for target in targets],
            )
        )
    return judged


def _continuous_arms(result: ReplayResult) -> list[ReplayArm]:
    return [arm for arm in result.arms if arm.spec.schedule == "continuous"]


def evaluated_scope(result: ReplayResult) -> str:
    """Name the examples the targets are judged on, e.g. ``on examples served from ...``."""
    holdout_from = result.config.holdout_from
    if holdout_from is None:
        return "on all served examples"
    return f"on examples served from {format_event_time(holdout_from.timestamp())}"


def overall_verdict(result: ReplayResult) -> str | None:
    """Return a one-line verdict on the main model's targets, or None without targets."""
    if not result.config.targets or not result.arms:
        return None
    return _verdict_text(judged_arms(result)[0], evaluated_scope(result))


def overall_outcome(result: ReplayResult) -> bool | None:
    """Return True when the main model met every target, False when it missed one, else None.

    None also covers a run without targets, and a run where no target was
    missed but one could not be measured.
    """
    if not result.config.targets or not result.arms:
        return None
    return _outcome(judged_arms(result)[0])


def _verdict_text(main: ArmVerdicts, scope: str) -> str:
    verdicts = main.verdicts
    noun = "success target" if len(verdicts) == 1 else "success targets"
    missed = [verdict for verdict in verdicts if verdict.met is False]
    unmeasurable = [verdict.target.metric for verdict in verdicts if verdict.met is None]
    met = len(verdicts) - len(missed) - len(unmeasurable)

    if missed:
        misses = "; ".join(
            f"{verdict.target.metric} {verdict.measured:.4f}, target "
            f"{verdict.target.operator} {verdict.target.value:g}"
            for verdict in missed
        )
        text = f"{main.arm} missed {len(missed)} of {len(verdicts)} {noun} {scope}: {misses}"
    elif unmeasurable:
        text = f"{main.arm} met {met} of {len(verdicts)} {noun} {scope}"
    else:
        return f"{main.arm} met all {len(verdicts)} {noun} {scope}"
    if unmeasurable:
        text += f"; not measurable: {', '.join(unmeasurable)}"
    return text


def _outcome(main: ArmVerdicts) -> bool | None:
    if any(verdict.met is False for verdict in main.verdicts):
        return False
    if all(verdict.met is True for verdict in main.verdicts):
        return True
    return None


def summary_lines(result: ReplayResult) -> list[str]:
    """List each continuous arm's verdict on each target.

    The main model's overall verdict is not repeated here: the summary states
    it at the top, under the baseline verdict.
    """
    if not result.config.targets or not result.arms:
        return []
    judged = judged_arms(result)
    scope = evaluated_scope(result)
    name_width = max(len(arm.arm) for arm in judged) + 2
    lines = [f"Success targets, served scores {scope}"]
    for arm in judged:
        for verdict in arm.verdicts:
            lines.append(f"  {arm.arm.ljust(name_width)}{verdict.describe()}")
    return lines


def target_paragraph(result: ReplayResult) -> str:
    """Return the main model's target verdict as an HTML paragraph, or "" without targets."""
    if not result.config.targets or not result.arms:
        return ""
    main = judged_arms(result)[0]
    css_class = {True: "verdict", False: "verdict worse", None: "verdict none"}[_outcome(main)]
    text = _verdict_text(main, evaluated_scope(result))
    return f'<p class="{css_class}">{_escape(text)}</p>'


def html_section(result: ReplayResult, directory: Path) -> str:
    """Render a table of every continuous arm's verdict on every target."""
    if not result.config.targets or not result.arms:
        return ""
    headers = ["model", "target", "measured", "result"]
    rows = []
    for arm in judged_arms(result):
        for verdict in arm.verdicts:
            measured = "n/a" if verdict.measured is None else f"{verdict.measured:.4f}"
            row_class = ' class="worse"' if verdict.met is False else ""
            rows.append(
                f"<tr{row_class}>"
                + _cell(arm.arm, number=False)
                + _cell(str(verdict.target), number=False)
                + _cell(measured)
                + _cell(_RESULT_WORDS[verdict.met], number=False)
                + "</tr>"
            )
    return (
        "<h2>Success targets</h2>"
        + target_paragraph(result)
        + _table(headers, rows)
        + '<p class="note">Each model is judged on its served scores '
        + _escape(evaluated_scope(result))
        + ". calibration_error is |calibration - 1|, the share by which predicted clicks "
        "miss observed ones. A target is not measurable when its metric is undefined on "
        "these examples, such as AUC or normalised entropy without any click. Rows in red "
        "are missed targets.</p>"
    )


def document(result: ReplayResult) -> dict[str, Any] | None:
    """Return every target verdict for metrics.json, or None without targets."""
    if not result.config.targets or not result.arms:
        return None
    judged = judged_arms(result)
    holdout_from = result.config.holdout_from
    evaluated_from = None if holdout_from is None else format_event_time(holdout_from.timestamp())
    return {
        "evaluated_from": evaluated_from,
        "all_met": _outcome(judged[0]),
        "verdict": _verdict_text(judged[0], evaluated_scope(result)),
        "arms": [
            {
                "arm": arm.arm,
                "model": arm.model,
                "targets": [
                    {
                        "target": str(verdict.target),
                        "metric": verdict.target.metric,
                        "operator": verdict.target.operator,
                        "value": verdict.target.value,
                        "measured": verdict.measured,
                        "met": verdict.met,
                    }
                    for verdict in arm.verdicts
                ],
            }
            for arm in judged
        ],
    }
