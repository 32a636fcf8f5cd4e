"""Replay's progressive log loss equals River's progressive_val_score.

When the window exceeds every click delay and the allowed lateness is zero,
the join reveals each label at the same event time as River's delayed
``simulate_qa``: a click at its own time, a negative when the window ends.
Scoring at arrival and learning at reveal must then give River's numbers.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from river import evaluate, metrics

from shared.events import Click, Impression
from shared.join import JoinSettings
from shared.learn.models import build_model
from shared.replay.runner import Replay, ReplayConfig

WINDOW = 600.0


def delayed_stream(seed: int, impressions: int):
    """Return (events in event-time order, [(features, label, delay)] in impression order)."""
    rng = random.Random(seed)
    timed: list[tuple[float, int, Impression | Click]] = []
    river_rows = []
    event_time = 1_700_000_000.0
    for index in range(impressions):
        event_time += rng.expovariate(1 / 3.0)
        item = f"item-{rng.randrange(30)}"
        features = {"ad": f"ad-{rng.randrange(8)}", "price": round(rng.uniform(1, 50), 2)}
        impression = Impression(
            impression_id=f"i{index}", event_time=event_time, item_id=item, features=features
        )
        timed.append((event_time, 0, impression))
        clicked = rng.random() < (0.3 if item < "item-1" else 0.05)
        delay = WINDOW
        if clicked:
            delay = rng.uniform(0.5, WINDOW - 1.0)
            timed.append(
                (
                    event_time + delay,
                    1,
                    Click(impression_id=f"i{index}", event_time=event_time + delay),
                )
            )
        river_rows.append((impression.learning_features(), clicked, event_time, delay))
    timed.sort(key=lambda entry: (entry[0], entry[1]))
    return [entry[2] for entry in timed], river_rows


def river_log_loss(model_name: str, rows) -> float:
    """Run River's own progressive validation with per-example moment and delay."""
    times = {id(x): t for x, _, t, _ in rows}
    delays = {id(x): d for x, _, _, d in rows}
    metric = evaluate.progressive_val_score(
        dataset=((x, y) for x, y, _, _ in rows),
        model=build_model(model_name),
        metric=metrics.LogLoss(),
        moment=lambda x: times[id(x)],
        delay=lambda x, y: delays[id(x)],
    )
    return metric.get()


@pytest.mark.parametrize("model_name", ["logreg", "prior"])
def test_replay_log_loss_equals_river(model_name: str) -> None:
    events, rows = delayed_stream(seed=7, impressions=3000)
    config = ReplayConfig(
        events=Path("unused"),
        model=model_name,
        delayed_feedback="none",
        join=JoinSettings(window_seconds=WINDOW, allowed_lateness_seconds=0),
    )

    result = Replay(config).replay(events)

    served = result.evaluation.served["model"]
    assert served.count == len(rows)
    assert served.loss_sum / served.count == pytest.approx(
        river_log_loss(model_name, rows), abs=1e-9
    )


def test_agreement_stream_has_both_labels() -> None:
    _, rows = delayed_stream(seed=7, impressions=3000)

    positives = sum(1 for _, clicked, _, _ in rows if clicked)

    assert 100 < positives < 1500
