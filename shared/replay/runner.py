"""The replay loop: a recorded stream through the same join, learner and metrics as live.

Replay is the live pipeline with its three moving parts swapped: a file for
Kafka, an in-memory store for Redis, and a manual clock for the wall clock.
Each impression is scored as it arrives, as the scorer would have served it;
each example is learned the moment the join decides its label.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.clock import ManualClock
from shared.errors import ConfigError
from shared.events import Click, Impression, LabeledExample, LabelSource
from shared.join import InMemoryJoinStore, JoinOutcome, JoinSettings, JoinStateMachine
from shared.learn.learner import DelayedFeedback, OnlineLearner, Scores
from shared.learn.models import DEFAULT_MODEL, build_model
from shared.metrics.evaluation import ProgressiveEvaluation
from shared.snapshots import ModelBundle, SigningKeys, load_snapshot
from shared.streams.recorded import InvalidLine, read_events

logger = logging.getLogger(__name__)

REPLAY_PARTITION = 0
# Events joined per call. Learning still follows event order inside a batch,
# so the size changes speed, never results.
REPLAY_BATCH_EVENTS = 512


def _batched(items: Iterable, size: int) -> Iterator[tuple]:
    # itertools.batched arrived in Python 3.12.
    iterator = iter(items)
    while batch := tuple(itertools.islice(iterator, size)):
        yield batch


class ReplayConfig(BaseModel):
    """Everything that decides a replay's numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    events: Path
    model: str = DEFAULT_MODEL
    delayed_feedback: DelayedFeedback = Field(
        default="fake_negative",
        description=(
            "fake_negative learns each impression as a negative when served and calibrates; "
            "none learns each example only when its label is decided."
        ),
    )
    join: JoinSettings = Field(default_factory=JoinSettings)
    segment_by: list[str] = Field(default_factory=list)
    initial_snapshot: Path | None = Field(
        default=None,
        description=(
            "Signed snapshot file to start from instead of an untrained model; it is "
            "verified with the ONLINE_CTR_SIGNING_KEYS keys and never written back."
        ),
    )
    rolling_window: int = Field(default=10_000, ge=1, description="Examples in the rolling window.")
    timeline_every: int = Field(
        default=500, ge=1, description="Examples between two rows of the metrics timeline."
    )


@dataclass
class ReplayResult:
    """The measurements of one replay."""

    config: ReplayConfig
    evaluation: ProgressiveEvaluation
    join_counts: Counter[JoinOutcome] = field(default_factory=Counter)
    impressions: int = 0
    clicks: int = 0
    invalid_lines: list[InvalidLine] = field(default_factory=list)
    label_counts: Counter[str] = field(default_factory=Counter)
    positive_delays: list[float] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    first_event_time: float | None = None
    last_event_time: float | None = None
    wall_seconds: float = 0.0

    @property
    def events(self) -> int:
        """Valid events read."""
        return self.impressions + self.clicks


class Replay:
    """One replay run; ``run`` may be called once."""

    def __init__(
        self,
        config: ReplayConfig,
        on_example: Callable[[LabeledExample], None] | None = None,
        on_progress: Callable[[int], None] | None = None,
        initial_bundle: ModelBundle | None = None,
    ) -> None:
        self.config = config
        self.machine = JoinStateMachine(InMemoryJoinStore(), config.join, ManualClock())
        if initial_bundle is None and config.initial_snapshot is not None:
            initial_bundle = load_snapshot_file(config.initial_snapshot)
        if initial_bundle is not None:
            # Learning must never reach the caller's objects: a second replay
            # from the same bundle has to start from the same state.
            model = copy.deepcopy(initial_bundle.model)
            baseline = copy.deepcopy(initial_bundle.baseline)
        else:
            model, baseline = build_model(config.model), None
        self.learner = OnlineLearner(
            model_name=config.model,
            model=model,
            baseline=baseline,
            evaluation=ProgressiveEvaluation(config.rolling_window, config.segment_by),
            delayed_feedback=config.delayed_feedback,
        )
        self.result = ReplayResult(config=config, evaluation=self.learner.evaluation)
        self._served: dict[str, Scores] = {}
        self._last_decided_at: float | None = None
        self._on_example = on_example
        self._on_progress = on_progress

    def run(self) -> ReplayResult:
        """Replay the whole stream, then close every window still open."""
        started = time.perf_counter()
        events = read_events(self.config.events, self.result.invalid_lines, self._on_progress)
        self.replay(events)
        self.result.wall_seconds = time.perf_counter() - started
        return self.result

    def replay(self, events: Iterable[Impression | Click]) -> ReplayResult:
        """Replay events in the order given, then flush; usable without a file."""
        for batch in _batched(events, REPLAY_BATCH_EVENTS):
            self._replay_batch(batch)

        self._learn_all(self.machine.flush(REPLAY_PARTITION))
        if self.learner.examples_learned % self.config.timeline_every != 0:
            self._add_timeline_row(self._last_decided_at)
        return self.result

    def _replay_batch(self, events: tuple[Impression | Click, ...]) -> None:
        """Join a batch in one call, then serve and learn in the order events would have."""
        result = self.result
        if result.first_event_time is None:
            result.first_event_time = events[0].ts
        result.last_event_time = events[-1].ts

        join_result = self.machine.process(REPLAY_PARTITION, events)
        examples = join_result.examples
        learned = 0
        for event, offset in zip(events, join_result.event_offsets, strict=True):
            if event.type != "impression":
                result.clicks += 1
                continue
            result.impressions += 1
            # Examples whose labels were decided before this impression
            # arrived are learned first; then the impression is served.
            self._learn(examples[learned:offset])
            learned = offset
            if event.impression_id not in self._served:
                self._served[event.impression_id] = self.learner.score(event)
                self.learner.on_served(event)
        self._learn(examples[learned:])
        result.join_counts.update(join_result.counts)

    def _learn_all(self, join_result) -> None:
        self._learn(join_result.examples)
        self.result.join_counts.update(join_result.counts)

    def _learn(self, examples: list[LabeledExample]) -> None:
        if not examples:
            return
        result = self.result
        for example in examples:
            impression_id = example.impression.impression_id
            if example.label_source == LabelSource.LATE_CLICK_CORRECTION:
                served = None
            else:
                served = self._served.pop(impression_id, None)
            self.learner.learn(example, served)

            result.label_counts[example.label_source.value] += 1
            if example.label_source == LabelSource.CLICK:
                result.positive_delays.append(example.label_delay_seconds)
            if self._on_example is not None:
                self._on_example(example)
            self._last_decided_at = example.decided_at.timestamp()
            if self.learner.examples_learned % self.config.timeline_every == 0:
                self._add_timeline_row(self._last_decided_at)

        keys = [example.dedup_key for example in examples]
        self.machine.store.acknowledge(REPLAY_PARTITION, keys)

    def _add_timeline_row(self, event_time: float | None) -> None:
        evaluation = self.learner.evaluation
        row: dict[str, Any] = {
            "event_time": event_time,
            "examples": self.learner.examples_learned,
        }
        for arm in ("model", "baseline"):
            overall = evaluation.served[arm]
            rolling = evaluation.rolling[arm].report()
            count = overall.count
            row[f"{arm}_log_loss"] = overall.loss_sum / count if count else None
            row[f"{arm}_rolling_log_loss"] = rolling.log_loss
            row[f"{arm}_rolling_normalized_entropy"] = rolling.normalized_entropy
            row[f"{arm}_rolling_auc"] = rolling.auc
            row[f"{arm}_rolling_calibration"] = rolling.calibration
        self.result.timeline.append(row)


def load_snapshot_file(path: Path) -> ModelBundle:
    """Load and verify a snapshot file with the keys in ONLINE_CTR_SIGNING_KEYS."""
    keys_text = os.environ.get("ONLINE_CTR_SIGNING_KEYS")
    key_id = os.environ.get("ONLINE_CTR_SIGNING_KEY_ID")
    if not keys_text or not key_id:
        raise ConfigError(
            "replaying from a snapshot needs ONLINE_CTR_SIGNING_KEYS and "
            "ONLINE_CTR_SIGNING_KEY_ID to verify it; set them to the trainer's keys"
        )
    try:
        blob = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read snapshot file {str(path)!r}: {error}") from None
    _, bundle = load_snapshot(blob, SigningKeys.parse(keys_text, key_id))
    return bundle


def run_replay(
    config: ReplayConfig,
    on_example: Callable[[LabeledExample], None] | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replay a recorded stream with the given settings and return what it measured."""
    return Replay(config, on_example, on_progress).run()
