"""Successive-halving selector: picks the better candidate, reports its race, fits the learner."""

from __future__ import annotations

import pickle
import random

import pytest
from river.metrics import LogLoss

from shared.cli import main
from shared.learn.learner import OnlineLearner
from shared.learn.models import REGISTRY, build_model, build_select
from shared.learn.sampling import FakeNegativeCalibrated
from shared.learn.selection import SuccessiveHalvingSelector, find_selector
from shared.streams.generate import GeneratorSettings, generate

# FTRL alpha far too small to move any weight, and one that learns.
TOO_SMALL_RATE = 1e-5
GOOD_RATE = 0.1


def generated_examples(seed: int, impressions: int = 3_000) -> list[tuple[dict, bool]]:
    """Return (features, clicked) per impression of a generated stream with strong item effects."""
    settings = GeneratorSettings(
        seed=seed, impressions=impressions, items=50, item_effect_sd=1.2, base_click_rate=0.08
    )
    events, truth = generate(settings)
    clicked = {record.impression_id: record.clicked for record in truth}
    return [
        (event.learning_features(), clicked[event.impression_id])
        for event in events
        if event.type == "impression"
    ]


def toy_examples(count: int, seed: int = 0) -> list[tuple[dict, bool]]:
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        item = rng.randrange(10)
        examples.append(({"item_id": f"i{item}", "price": float(item)}, rng.random() < item / 20))
    return examples


def test_selector_picks_learning_rate_that_learns() -> None:
    picks = []
    for seed in range(5):
        # Two candidates and eta 2: one cut, after budget / 2 = 1,500 learn calls.
        selector = build_select(learning_rates=(TOO_SMALL_RATE, GOOD_RATE), budget=3_000)
        for x, y in generated_examples(seed):
            selector.learn_one(x, y)
        picks.append(next(c.name for c in selector.candidates() if c.status == "selected"))

    good = f"ctr alpha={GOOD_RATE:g}"
    assert picks.count(good) >= 4, picks


def test_selector_records_rungs_and_examples() -> None:
    selector = build_select(budget=800)
    for x, y in toy_examples(300):
        selector.learn_one(x, y)

    candidates = selector.candidates()
    # Four candidates, eta 2: two dropped after budget / 8 = 100 calls, one after budget / 4.
    assert [rung.learn_calls for rung in selector.rungs] == [100, 200]
    assert [len(rung.dropped) for rung in selector.rungs] == [2, 1]
    assert sorted(c.examples_learned for c in candidates) == [100, 100, 200, 300]
    assert sorted(c.status for c in candidates) == [
        "eliminated",
        "eliminated",
        "eliminated",
        "selected",
    ]
    selected = next(c for c in candidates if c.status == "selected")
    assert selected.best
    assert selected.eliminated_after is None
    assert selector.learn_calls == 300


def test_rung_drops_the_worse_half() -> None:
    selector = build_select(budget=800)
    for x, y in toy_examples(120):
        selector.learn_one(x, y)

    rung = selector.rungs[0]
    kept_indices = [index for index in rung.metric_values if index not in rung.dropped]
    # Log loss: lower is better, so every kept candidate beat every dropped one.
    assert max(rung.metric_values[index] for index in kept_indices) <= min(
        rung.metric_values[index] for index in rung.dropped
    )


def test_selector_predicts_with_best_candidate() -> None:
    selector = build_select(budget=800)
    examples = toy_examples(300)
    for x, y in examples:
        selector.learn_one(x, y)

    x = examples[0][0]
    best = selector.models[selector.best_index]
    assert selector.predict_proba_one(x) == best.predict_proba_one(x)


def test_selector_pickles_with_its_race() -> None:
    selector = build_select(budget=800)
    examples = toy_examples(150)
    for x, y in examples:
        selector.learn_one(x, y)

    restored = pickle.loads(pickle.dumps(selector))

    assert restored.candidates() == selector.candidates()
    assert restored.rungs == selector.rungs
    assert restored.predict_proba_one(examples[0][0]) == selector.predict_proba_one(examples[0][0])


def test_selector_clone_is_untrained() -> None:
    selector = build_select(budget=800)
    for x, y in toy_examples(150):
        selector.learn_one(x, y)

    clone = selector.clone()

    assert isinstance(clone, SuccessiveHalvingSelector)
    assert clone.candidate_names == selector.candidate_names
    assert clone.learn_calls == 0
    assert clone.rungs == []


def test_selector_rejects_sample_weight() -> None:
    selector = build_select()

    with pytest.raises(ValueError, match="sample weight 2.0"):
        selector.learn_one({"item_id": "a"}, True, w=2.0)


def test_selector_rejects_mismatched_names() -> None:
    models = [build_model("logreg") for _ in range(4)]

    with pytest.raises(ValueError, match="2 candidate names for 4 models"):
        SuccessiveHalvingSelector(models, LogLoss(), budget=800, candidate_names=["a", "b"])


def test_selector_learns_under_fake_negatives() -> None:
    learner = OnlineLearner(model_name="select", delayed_feedback="fake_negative")

    assert isinstance(learner.model, FakeNegativeCalibrated)
    selector = find_selector(learner.model)
    assert selector is not None
    for x, y in toy_examples(50):
        learner.model.learn_one(x, False)
        if y:
            learner.model.learn_one(x, True)
    probability = learner.model.predict_proba_one({"item_id": "i3", "price": 3.0})[True]
    assert 0.0 < probability < 1.0
    assert selector.learn_calls >= 50


def test_find_selector_ignores_other_models() -> None:
    assert find_selector(build_model("ctr")) is None
    assert find_selector(FakeNegativeCalibrated(build_model("logreg"))) is None


def test_models_command_lists_select(capsys: pytest.CaptureFixture[str]) -> None:
    assert "select" in REGISTRY

    status = main(["models"])

    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("select: Race the ctr model") for line in lines), lines
