"""Learning quality on delayed click streams: every registry model, the prior and Vowpal Wabbit.

All models see the same impressions with the same delayed reveal: each
impression is scored when it arrives, and learned when the join decides its
label (a click at its own time, a negative when its window closes). The
normalised entropy (NE) after warm-up leaves out impressions in the first two
windows of the stream, where models have seen few labels and only positives.

Usage:
  python bench/quality.py                        # bundled sample and a generated stream
  python bench/quality.py --taobao PATH          # also the Taobao UserBehavior CSV at PATH

Vowpal Wabbit comes from the PyPI package ``vowpalwabbit``, a benchmark-only
dependency; without it the VW row is left out with a message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.events import Click, Impression, LabeledExample, LabelSource
from shared.join import InMemoryJoinStore, JoinSettings, JoinStateMachine
from shared.learn.learner import DelayedFeedback, OnlineLearner
from shared.learn.models import DEFAULT_MODEL, REGISTRY, build_model
from shared.metrics.binary import binary_entropy, log_loss_one, roc_auc
from shared.streams.generate import ExponentialDelay, GeneratorSettings, generate
from shared.streams.recorded import read_events

SAMPLE = Path(__file__).parents[1] / "data" / "samples" / "obd-small.jsonl.gz"
WARM_UP_WINDOWS = 2
BATCH = 512


@dataclass
class Stream:
    """A named stream with the attribution window it is judged with."""

    name: str
    events: list[Impression | Click]
    window_seconds: float
    truth: dict[str, float] | None = None


def delayed_operations(stream: Stream) -> list[tuple[int, object]]:
    """Return the serve (0, impression) and learn (1, example) steps in the order they happen."""
    machine = JoinStateMachine(
        InMemoryJoinStore(),
        JoinSettings(window_seconds=stream.window_seconds, allowed_lateness_seconds=60.0),
    )
    operations: list[tuple[int, object]] = []
    for start in range(0, len(stream.events), BATCH):
        events = stream.events[start : start + BATCH]
        result = machine.process(0, events)
        learned = 0
        for event, offset in zip(events, result.event_offsets, strict=True):
            if event.type != "impression":
                continue
            operations += [(1, example) for example in result.examples[learned:offset]]
            learned = offset
            operations.append((0, event))
        operations += [(1, example) for example in result.examples[learned:]]
        machine.store.acknowledge(0, [example.dedup_key for example in result.examples])
    operations += [(1, example) for example in machine.flush(0).examples]
    return operations


class RiverModel:
    """A model from the registry, through the same learner replay and the trainer use."""

    def __init__(self, name: str, delayed_feedback: DelayedFeedback = "none") -> None:
        self.name = name if delayed_feedback == "none" else f"{name} + fake negatives"
        self.learner = OnlineLearner(
            model_name=name, model=build_model(name), delayed_feedback=delayed_feedback
        )

    def predict(self, impression: Impression) -> float:
        probability = self.learner.score(impression).model
        self.learner.on_served(impression)
        return probability

    def learn(self, example: LabeledExample) -> None:
        self.learner.learn(example, None)


class VowpalWabbit:
    """Vowpal Wabbit logistic regression on the same features, one namespace per feature."""

    name = "vw"

    def __init__(self, options: str = "--loss_function logistic --link logistic -b 20") -> None:
        from vowpalwabbit import Workspace

        self.workspace = Workspace(f"{options} --quiet")

    @staticmethod
    def _line(impression: Impression) -> str:
        parts = []
        for index, (name, value) in enumerate(sorted(impression.learning_features().items())):
            namespace = chr(ord("a") + index % 26)
            if isinstance(value, bool) or isinstance(value, str):
                token = f"{name}={value}".replace(" ", "_").replace(":", ";").replace("|", "/")
                parts.append(f"|{namespace} {token}")
            else:
                parts.append(f"|{namespace} {name.replace(':', ';')}:{float(value)}")
        return " ".join(parts)

    def predict(self, impression: Impression) -> float:
        return float(self.workspace.predict(self._line(impression)))

    def learn(self, example: LabeledExample) -> None:
        label = 1 if example.label else -1
        self.workspace.learn(f"{label} {self._line(example.impression)}")


class Oracle:
    """The true click probability of each impression: the Bayes-optimal predictor."""

    name = "bayes-optimal"

    def __init__(self, truth: dict[str, float]) -> None:
        self.truth = truth

    def predict(self, impression: Impression) -> float:
        return self.truth[impression.impression_id]

    def learn(self, example: LabeledExample) -> None:
        pass


def evaluate(model, operations: Sequence[tuple[int, object]], warm_up_until: float) -> dict:
    """Run the operations through one model and return its metrics."""
    served: dict[str, float] = {}
    scores, labels, times = [], [], []
    started = time.perf_counter()
    for kind, payload in operations:
        if kind == 0:
            served.setdefault(payload.impression_id, model.predict(payload))
            continue
        if payload.label_source != LabelSource.LATE_CLICK_CORRECTION:
            scores.append(served.pop(payload.impression.impression_id))
            labels.append(payload.label)
            times.append(payload.impression.ts)
        model.learn(payload)
    seconds = time.perf_counter() - started

    scores_array, labels_array = np.array(scores), np.array(labels)
    after = np.array(times) >= warm_up_until
    return {
        "ne_after_warm_up": normalized_entropy(scores_array[after], labels_array[after]),
        "ne_all": normalized_entropy(scores_array, labels_array),
        "calibration": scores_array[after].sum() / max(labels_array[after].sum(), 1),
        "auc": roc_auc(scores_array[after], labels_array[after]),
        "impressions_per_second": len(scores) / seconds if seconds else math.inf,
    }


def normalized_entropy(scores: np.ndarray, labels: np.ndarray) -> float | None:
    if len(labels) == 0:
        return None
    loss = np.mean([log_loss_one(p, y) for p, y in zip(scores, labels, strict=True)])
    entropy = binary_entropy(labels.mean())
    return loss / entropy if entropy else None


def load_streams(taobao: Path | None, generated_impressions: int) -> list[Stream]:
    streams = [Stream("open-bandit sample", list(read_events(SAMPLE)), 600.0)]
    if taobao is not None:
        from shared.streams.taobao import iter_taobao

        streams.append(Stream("taobao slice (buy)", list(iter_taobao(taobao)), 1800.0))
    settings = GeneratorSettings(
        seed=7,
        impressions=generated_impressions,
        impressions_per_second=5.0,
        base_click_rate=0.03,
        delay=ExponentialDelay(mean_seconds=180.0),
        start_time=dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
    )
    events, truth = generate(settings)
    streams.append(
        Stream(
            "generated (known truth)",
            list(events),
            600.0,
            truth={record.impression_id: record.true_probability for record in truth},
        )
    )
    return streams


def model_factories(stream: Stream) -> list[Callable[[], object]]:
    factories: list[Callable[[], object]] = [
        (lambda name=name: RiverModel(name)) for name in sorted(REGISTRY)
    ]
    # The default model as replay runs it, to show what fake negatives do
    # to the start-up bias (NE over all impressions against NE after warm-up).
    factories.append(lambda: RiverModel(DEFAULT_MODEL, "fake_negative"))
    try:
        import vowpalwabbit  # noqa: F401

        factories.append(VowpalWabbit)
    except ImportError:
        print("vowpalwabbit is not installed; `pip install vowpalwabbit` adds the VW row")
    if stream.truth is not None:
        factories.append(lambda: Oracle(stream.truth))
    return factories


def format_value(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(stream: Stream, results: Iterable[tuple[str, dict]]) -> None:
    impressions = sum(1 for event in stream.events if event.type == "impression")
    clicks = sum(1 for event in stream.events if event.type == "click")
    print(
        f"\n### {stream.name}: {impressions:,} impressions, {clicks:,} clicks, "
        f"window {stream.window_seconds / 60:.0f} min\n"
    )
    print("| model | NE after warm-up | NE over all | calibration | AUC | impressions/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, metrics in results:
        print(
            f"| {name} | {format_value(metrics['ne_after_warm_up'])} | "
            f"{format_value(metrics['ne_all'], 3)} | {format_value(metrics['calibration'], 3)} | "
            f"{format_value(metrics['auc'], 3)} | {metrics['impressions_per_second']:,.0f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--taobao", type=Path, default=None, help="Taobao UserBehavior CSV")
    parser.add_argument(
        "--generated-impressions", type=int, default=100_000, help="size of the generated stream"
    )
    args = parser.parse_args()

    for stream in load_streams(args.taobao, args.generated_impressions):
        operations = delayed_operations(stream)
        first = min(event.ts for event in stream.events)
        warm_up_until = first + WARM_UP_WINDOWS * stream.window_seconds
        results = []
        for factory in model_factories(stream):
            model = factory()
            results.append((model.name, evaluate(model, operations, warm_up_until)))
        report(stream, results)


if __name__ == "__main__":
    main()
