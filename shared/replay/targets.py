"""Success targets: the metric a team deploys by, and the value it must reach."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TargetMetric = Literal["normalized_entropy", "log_loss", "auc", "calibration_error"]
Operator = Literal["<=", ">="]

_TARGET_TEXT = re.compile(r"^\s*([a-z_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


class Target(BaseModel):
    """One success criterion, e.g. ``normalized_entropy <= 0.95`` or ``auc >= 0.70``.

    ``calibration_error`` is ``|calibration - 1|``: the share by which the
    predicted clicks miss the observed ones, in either direction.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    metric: TargetMetric
    operator: Operator
    value: float = Field(description="The threshold the metric must reach.")

    @classmethod
    def parse(cls, text: str) -> Target:
        """Read ``METRIC<=VALUE`` or ``METRIC>=VALUE``; raise ValueError saying what is wrong."""
        match = _TARGET_TEXT.match(text)
        if match is None:
            raise ValueError(
                f"cannot read target {text!r}; write METRIC<=VALUE or METRIC>=VALUE, "
                "e.g. normalized_entropy<=0.95 or auc>=0.7"
            )
        metric, operator, value = match.groups()
        return cls.model_validate({"metric": metric, "operator": operator, "value": value})

    def __str__(self) -> str:
        return f"{self.metric} {self.operator} {self.value:g}"

    def measure(self, report: dict[str, Any]) -> float | None:
        """Read this target's metric from a binary-metrics report; None when undefined."""
        if self.metric == "calibration_error":
            calibration = report.get("calibration")
            return None if calibration is None else abs(calibration - 1.0)
        value = report.get(self.metric)
        return None if value is None or not math.isfinite(value) else float(value)

    def judge(self, report: dict[str, Any]) -> TargetVerdict:
        """Say whether a binary-metrics report meets this target."""
        measured = self.measure(report)
        if measured is None:
            met = None
        elif self.operator == "<=":
            met = measured <= self.value
        else:
            met = measured >= self.value
        return TargetVerdict(target=self, measured=measured, met=met)


@dataclass(frozen=True, slots=True)
class TargetVerdict:
    """A target, the value measured for it, and whether it was met (None: not measurable)."""

    target: Target
    measured: float | None
    met: bool | None

    def describe(self) -> str:
        """Return one phrase, e.g. ``met: normalized_entropy 0.9412 <= 0.95``."""
        target = self.target
        if self.met is None:
            return f"not measurable: {target.metric} is undefined on these examples"
        word = "met" if self.met else "missed"
        return f"{word}: {target.metric} {self.measured:.4f} {target.operator} {target.value:g}"
