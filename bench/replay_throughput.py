"""Replay throughput against a bare River loop on the same examples.

The reference is the least any replay must do: for each impression, in
order, ``predict_proba_one`` and ``learn_one`` with the same model and
features, labels known in advance, nothing parsed or joined. Replay adds
parsing and validation, the event-time join, the baseline model, the
delayed reveal and the metrics. The ratio is reference time over replay time
on the same impressions; 1.0 would mean replay costs nothing extra.

Usage: python bench/replay_throughput.py [--events PATH] [--model NAME] [--repeat N]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import river

from shared.learn.models import build_model
from shared.replay.runner import Replay, ReplayConfig
from shared.streams.recorded import read_events

DEFAULT_EVENTS = Path(__file__).parents[1] / "data" / "samples" / "obd-small.jsonl.gz"


def bare_river_seconds(model_name: str, rows: list[tuple[dict, bool]]) -> float:
    model = build_model(model_name)
    started = time.perf_counter()
    for x, y in rows:
        model.predict_proba_one(x)
        model.learn_one(x, y)
    return time.perf_counter() - started


def replay_seconds(config: ReplayConfig, events=None) -> float:
    started = time.perf_counter()
    replay = Replay(config)
    if events is None:
        replay.run()
    else:
        replay.replay(events)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=Path, default=DEFAULT_EVENTS, help="recorded stream")
    parser.add_argument("--model", default="logreg", help="model from the registry")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; median kept")
    args = parser.parse_args()

    events = list(read_events(args.events))
    clicked = {event.impression_id for event in events if event.type == "click"}
    rows = [
        (event.learning_features(), event.impression_id in clicked)
        for event in events
        if event.type == "impression"
    ]
    config = ReplayConfig(events=args.events, model=args.model)

    bare = statistics.median(bare_river_seconds(args.model, rows) for _ in range(args.repeat))
    full = statistics.median(replay_seconds(config) for _ in range(args.repeat))
    parsed = statistics.median(replay_seconds(config, events) for _ in range(args.repeat))

    impressions = len(rows)
    print(f"stream: {args.events} ({impressions:,} impressions, {len(events):,} events)")
    print(f"model: {args.model}; River {river.__version__}; Python {platform.python_version()}")
    print(f"machine: {platform.machine()}, {platform.processor() or 'unknown CPU'}")
    print()
    print(f"{'measurement':44} {'seconds':>8} {'impressions/s':>14} {'ratio':>6}")
    for name, seconds in (
        ("bare River loop (reference)", bare),
        ("replay from the file (make replay's path)", full),
        ("replay of parsed events (no file, no parse)", parsed),
    ):
        print(f"{name:44} {seconds:8.2f} {impressions / seconds:14,.0f} {bare / seconds:6.2f}")


if __name__ == "__main__":
    main()
