"""The replay loop: a recorded stream through the same join, learner and metrics as live.

Replay is the live pipeline with its three moving parts swapped: a file for
Kafka, an in-memory store for Redis, and a manual clock for the wall clock.
Each impression is scored as it arrives, as the scorer would have served it;
each example is learned the moment the join decides its label.
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import logging
import os
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from shared.clock import ManualClock
from shared.errors import ConfigError
from shared.events import Click, Impression, LabeledExample, LabelSource
from shared.join import InMemoryJoinStore, JoinOutcome, JoinSettings, JoinStateMachine
from shared.learn.learner import DelayedFeedback, OnlineLearner, Scores
from shared.learn.models import DEFAULT_MODEL, build_model
from shared.metrics.evaluation import ProgressiveEvaluation
from shared.replay.arms import ArmSpec, ReplayArm
from shared.replay.targets import Target
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

    # Offline A/B.
    compare: list[str] = Field(
        default_factory=list,
        description=(
            "Other registry models replayed on the same examples and compared with `model` "
            "by paired bootstrap."
        ),
    )
    confidence_level: float = Field(
        default=0.95, gt=0.5, lt=1.0, description="Confidence level of the bootstrap intervals."
    )
    bootstrap_samples: int = Field(
        default=1000,
        ge=100,
        description="Bootstrap resamples, shared by every compared model and metric.",
    )
    bootstrap_seed: int = Field(default=0, description="Seed of the bootstrap resampling.")

    # Success target.
    targets: list[Target] = Field(
        default_factory=list,
        description="Success criteria each model is judged by, e.g. normalized_entropy <= 0.95.",
    )

    # Time holdout.
    holdout_from: AwareDatetime | None = Field(
        default=None,
        description="Evaluate only examples whose impression time is at or after this time.",
    )
    after_holdout: Literal["learn", "freeze"] = Field(
        default="learn",
        description="After holdout_from, keep learning (learn) or stop learning (freeze).",
    )

    # Freshness experiment.
    freshness: bool = Field(
        default=False,
        description=(
            "Also replay the model frozen at freeze_at, and retrained from scratch every "
            "retrain_every_seconds, next to continuous learning."
        ),
    )
    freeze_at: AwareDatetime | None = Field(
        default=None,
        description=(
            "Event time the frozen and retrained copies stop learning online; default: "
            "holdout_from, else the first event time plus retrain_every_seconds."
        ),
    )
    retrain_every_seconds: float = Field(
        default=86_400.0, gt=0, description="Event time between two retrains from scratch."
    )

    # Segments.
    slice_min_count: int = Field(
        default=500,
        ge=1,
        description="Segments with fewer served examples are grouped into one row.",
    )
    calibration_tolerance: float = Field(
        default=0.2,
        gt=0,
        description="A segment whose calibration is off 1.0 by more than this is flagged.",
    )

    # Attribution-window what-if.
    what_if_windows: list[float] = Field(
        default_factory=list,
        description="Attribution windows in seconds to compare, each in its own replay.",
    )
    max_missed_click_share: float = Field(
        default=0.05,
        ge=0,
        le=1,
        description="The window recommendation misses at most this share of clicks.",
    )

    @model_validator(mode="after")
    def _check_arms(self) -> ReplayConfig:
        names = [self.model, *self.compare]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"model {repeated[0]!r} is listed twice among model and compare; "
                "give each compared model once"
            )
        if self.join.emit_served:
            raise ValueError(
                "join.emit_served is for the live joiner; replay serves each impression "
                "itself, so leave it false"
            )
        if any(window <= 0 for window in self.what_if_windows):
            raise ValueError(
                f"what-if windows must be positive seconds, got {self.what_if_windows}"
            )
        return self


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
    # Every arm, the first being the main model whose metrics are `evaluation`.
    arms: list[ReplayArm] = field(default_factory=list)
    # The impression time of each example in the served-score metrics, in
    # their order: the same for every arm, so metrics can be cut by time.
    evaluated_times: array = field(default_factory=lambda: array("d"))
    # Examples whose impression came before holdout_from: learned, never evaluated.
    examples_before_holdout: int = 0
    # Set by the attribution-window what-if when it ran (shared.replay.experiments.windows).
    what_if: Any = None
    # Results that experiments compute once for the summary, the report and
    # metrics.json, by experiment name; see cached().
    _experiment_cache: dict[str, tuple[int, Any]] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def events(self) -> int:
        """Valid events read."""
        return self.impressions + self.clicks

    def cached(self, name: str, compute: Callable[[ReplayResult], Any]) -> Any:
        """Return ``compute(self)``, computed once while no further example is evaluated."""
        examples = len(self.evaluated_times)
        cached = self._experiment_cache.get(name)
        if cached is None or cached[0] != examples:
            cached = self._experiment_cache[name] = (examples, compute(self))
        return cached[1]

    def arm(self, name: str) -> ReplayArm:
        """Return the arm with this name; raise KeyError naming the arms there are."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(f"no arm named {name!r}; arms: {[arm.name for arm in self.arms]}")


def freshness_arm_names(model: str, retrain_every_seconds: float) -> tuple[str, str]:
    """Return the names of the frozen and the retrained copies of ``model``."""
    from shared.replay.summary import format_duration

    return f"{model} frozen", f"{model} retrained every {format_duration(retrain_every_seconds)}"


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
        self._initial_bundle = initial_bundle

        self._holdout_from = _seconds(config.holdout_from)
        main_until = self._holdout_from if config.after_holdout == "freeze" else None
        # Segments are measured for the main model only; the others are compared overall.
        self.arms = [
            self._new_arm(ArmSpec(config.model, config.model, learn_until=main_until), True)
        ]
        self.arms += [
            self._new_arm(ArmSpec(name, name, learn_until=main_until)) for name in config.compare
        ]
        # The freshness copies need the first event time when freeze_at is not given.
        self._freshness_pending = config.freshness

        self.result = ReplayResult(
            config=config, evaluation=self.learner.evaluation, arms=self.arms
        )
        self._served: dict[str, list[Scores]] = {}
        self._examples_decided = 0
        self._last_decided_at: float | None = None
        self._on_example = on_example
        self._on_progress = on_progress

    @property
    def learner(self) -> OnlineLearner:
        """The main model's learner."""
        return self.arms[0].learner

    def _new_arm(self, spec: ArmSpec, segments: bool = False) -> ReplayArm:
        config = self.config
        bundle = self._initial_bundle
        if bundle is not None and spec.model == config.model:
            # Learning must never reach the caller's objects: a second replay
            # from the same bundle has to start from the same state.
            model = copy.deepcopy(bundle.model)
            baseline = copy.deepcopy(bundle.baseline)
        else:
            model, baseline = build_model(spec.model), None
        learner = OnlineLearner(
            model_name=spec.model,
            model=model,
            baseline=baseline,
            evaluation=ProgressiveEvaluation(
                config.rolling_window, config.segment_by if segments else ()
            ),
            delayed_feedback=config.delayed_feedback,
        )
        return ReplayArm(spec, learner)

    def _add_freshness_arms(self, first_event_time: float) -> None:
        config = self.config
        freeze_at = _seconds(config.freeze_at)
        if freeze_at is None:
            freeze_at = self._holdout_from
        if freeze_at is None:
            freeze_at = first_event_time + config.retrain_every_seconds
        frozen, retrained = freshness_arm_names(config.model, config.retrain_every_seconds)
        self.arms.append(
            self._new_arm(ArmSpec(frozen, config.model, "frozen", learn_until=freeze_at))
        )
        self.arms.append(
            self._new_arm(
                ArmSpec(
                    retrained,
                    config.model,
                    "retrain",
                    learn_until=freeze_at,
                    retrain_every=config.retrain_every_seconds,
                )
            )
        )
        self._freshness_pending = False

    def run(self) -> ReplayResult:
        """Replay the whole stream, then close every window still open."""
        started = time.perf_counter()
        events = read_events(self.config.events, self.result.invalid_lines, self._on_progress)
        self.replay(events)
        self.result.wall_seconds = time.perf_counter() - started
        return self.result

    def replay(self, events: Iterable[Impression | Click]) -> ReplayResult:
        """Replay events in the order given, then flush; usable without a file."""
        self.feed(events)
        return self.finish()

    def feed(self, events: Iterable[Impression | Click]) -> None:
        """Replay events in the order given and leave open windows open for more.

        Several replays can take one stream in step this way, batch by batch,
        and give the same numbers as one ``replay`` call each.
        """
        for batch in _batched(events, REPLAY_BATCH_EVENTS):
            self._replay_batch(batch)

    def finish(self) -> ReplayResult:
        """Close every window still open, as at the end of input, and return the result."""
        self._learn_all(self.machine.flush(REPLAY_PARTITION))
        if self._examples_decided % self.config.timeline_every != 0:
            self._add_timeline_row(self._last_decided_at)
        return self.result

    def _replay_batch(self, events: tuple[Impression | Click, ...]) -> None:
        """Join a batch in one call, then serve and learn in the order events would have."""
        result = self.result
        if result.first_event_time is None:
            result.first_event_time = events[0].ts
            if self._freshness_pending:
                self._add_freshness_arms(events[0].ts)
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
                self._served[event.impression_id] = [arm.serve(event) for arm in self.arms]
        self._learn(examples[learned:])
        result.join_counts.update(join_result.counts)

    def _learn_all(self, join_result) -> None:
        self._learn(join_result.examples)
        self.result.join_counts.update(join_result.counts)

    def _learn(self, examples: list[LabeledExample]) -> None:
        if not examples:
            return
        result = self.result
        holdout_from = self._holdout_from
        for example in examples:
            impression = example.impression
            if example.label_source == LabelSource.LATE_CLICK_CORRECTION:
                served = None
            else:
                served = self._served.pop(impression.impression_id, None)
            evaluate = holdout_from is None or impression.ts >= holdout_from
            for index, arm in enumerate(self.arms):
                arm.learn(example, None if served is None else served[index], evaluate)
            if evaluate and served is not None:
                result.evaluated_times.append(impression.ts)
            elif not evaluate:
                result.examples_before_holdout += 1

            result.label_counts[example.label_source.value] += 1
            if example.label_source == LabelSource.CLICK:
                result.positive_delays.append(example.label_delay_seconds)
            if self._on_example is not None:
                self._on_example(example)
            self._last_decided_at = example.decided_at.timestamp()
            self._examples_decided += 1
            if self._examples_decided % self.config.timeline_every == 0:
                self._add_timeline_row(self._last_decided_at)

        keys = [example.dedup_key for example in examples]
        self.machine.store.acknowledge(REPLAY_PARTITION, keys)

    def _add_timeline_row(self, event_time: float | None) -> None:
        row: dict[str, Any] = {"event_time": event_time, "examples": self._examples_decided}
        main = self.learner.evaluation
        for arm in ("model", "baseline"):
            row.update(_timeline_columns(arm, main, arm))
        for replay_arm in self.arms[1:]:
            row.update(_timeline_columns(replay_arm.key, replay_arm.learner.evaluation, "model"))
        self.result.timeline.append(row)


def _timeline_columns(prefix: str, evaluation: ProgressiveEvaluation, arm: str) -> dict[str, Any]:
    overall = evaluation.served[arm]
    rolling = evaluation.rolling[arm].report()
    count = overall.count
    return {
        f"{prefix}_log_loss": overall.loss_sum / count if count else None,
        f"{prefix}_rolling_log_loss": rolling.log_loss,
        f"{prefix}_rolling_normalized_entropy": rolling.normalized_entropy,
        f"{prefix}_rolling_auc": rolling.auc,
        f"{prefix}_rolling_calibration": rolling.calibration,
    }


def _seconds(moment: dt.datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


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
