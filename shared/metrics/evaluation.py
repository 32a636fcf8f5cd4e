"""Progressive evaluation of a model against its baseline: overall, rolling and per segment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shared.metrics.binary import BinaryMetrics, RollingBinaryMetrics

if TYPE_CHECKING:
    from shared.events import LabeledExample
    from shared.learn.learner import Scores

ARMS = ("model", "baseline")
# A segment value not seen among the first this many distinct values of its
# feature is counted under "(other)", so a high-cardinality feature cannot
# grow the report without bound.
MAX_SEGMENT_VALUES = 200
OTHER_SEGMENT = "(other)"


class ProgressiveEvaluation:
    """Metrics of served and pre-learn scores for the model and the baseline.

    Served scores drive the overall, rolling and per-segment metrics, because
    they are what users saw. Pre-learn scores, taken just before each example
    is learned, are kept overall to show what the label delay costs.
    """

    def __init__(self, rolling_window: int = 10_000, segment_by: Sequence[str] = ()) -> None:
        self.rolling_window = rolling_window
        self.segment_by = tuple(segment_by)
        self.served = {arm: BinaryMetrics() for arm in ARMS}
        self.prelearn = {arm: BinaryMetrics() for arm in ARMS}
        self.rolling = {arm: RollingBinaryMetrics(rolling_window) for arm in ARMS}
        self.segments: dict[str, dict[str, dict[str, BinaryMetrics]]] = {
            feature: {} for feature in self.segment_by
        }
        self.unserved = 0

    def update(
        self, example: LabeledExample, served: Scores | None, prelearn: Scores | None
    ) -> None:
        """Add one labelled example with its served and pre-learn scores, either may be None."""
        label = example.label
        if prelearn is not None:
            self.prelearn["model"].update(prelearn.model, label)
            self.prelearn["baseline"].update(prelearn.baseline, label)
        if served is None:
            self.unserved += 1
            return

        loss = self.served["model"].update(served.model, label)
        self.rolling["model"].update(served.model, label, loss)
        loss = self.served["baseline"].update(served.baseline, label)
        self.rolling["baseline"].update(served.baseline, label, loss)

        for feature in self.segment_by:
            segment = self._segment(feature, example)
            segment["model"].update(served.model, label)
            segment["baseline"].update(served.baseline, label)

    def _segment(self, feature: str, example: LabeledExample) -> dict[str, BinaryMetrics]:
        impression = example.impression
        if feature == "item_id":
            raw_value: Any = impression.item_id
        elif feature == "user_id":
            raw_value = impression.user_id
        else:
            raw_value = impression.features.get(feature)
        value = "(missing)" if raw_value is None else str(raw_value)

        by_value = self.segments[feature]
        metrics = by_value.get(value)
        if metrics is None:
            if len(by_value) >= MAX_SEGMENT_VALUES:
                value = OTHER_SEGMENT
                metrics = by_value.get(value)
            if metrics is None:
                metrics = by_value[value] = {arm: BinaryMetrics() for arm in ARMS}
        return metrics

    def report(self) -> dict[str, Any]:
        """Return every metric as nested plain dicts, ready for JSON."""
        return {
            "served": {arm: self.served[arm].report().as_dict() for arm in ARMS},
            "prelearn": {arm: self.prelearn[arm].report().as_dict() for arm in ARMS},
            "rolling": {
                "window": self.rolling_window,
                **{arm: self.rolling[arm].report().as_dict() for arm in ARMS},
            },
            "segments": {
                feature: {
                    value: {arm: metrics[arm].report().as_dict() for arm in ARMS}
                    for value, metrics in sorted(by_value.items())
                }
                for feature, by_value in self.segments.items()
            },
            "unserved_examples": self.unserved,
        }
