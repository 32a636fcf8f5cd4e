"""Console summary of a replay: contents, width, verdict and the cases without clicks."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from shared.events import Click, Impression, LabelSource
from shared.join import JoinOutcome
from shared.replay.runner import Replay, ReplayConfig, ReplayResult
from shared.replay.summary import (
    SUMMARY_WIDTH,
    format_duration,
    format_event_time,
    format_metric,
    format_summary,
    label_delay_quantiles,
    normalized_entropy_verdict,
)

# Per-ad click probabilities far apart, so a model that learns the ad beats the running rate.
CLICK_PROBABILITIES = {"often": 0.4, "rarely": 0.02}


def synthetic_events(
    impressions: int = 600, seed: int = 2, clicks: bool = True
) -> list[Impression | Click]:
    """Build impressions 3 s apart for two ads in turn, each click after a mean delay of 40 s."""
    rng = random.Random(seed)
    timed: list[tuple[float, int, Impression | Click]] = []
    for n in range(impressions):
        event_time = n * 3.0
        ad = "often" if n % 2 else "rarely"
        impression = Impression(
            impression_id=f"i{n}", event_time=event_time, item_id=f"item-{ad}", features={"ad": ad}
        )
        timed.append((event_time, 0, impression))
        if clicks and rng.random() < CLICK_PROBABILITIES[ad]:
            click_time = event_time + rng.expovariate(1.0 / 40.0)
            timed.append((click_time, 1, Click(impression_id=f"i{n}", event_time=click_time)))
    timed.sort(key=lambda item: (item[0], item[1]))
    return [event for _, _, event in timed]


def replay(
    events: list[Impression | Click], model: str = "logreg", path: str = "unused"
) -> ReplayResult:
    config = ReplayConfig(
        events=Path(path), model=model, segment_by=["ad"], delayed_feedback="none"
    )
    return Replay(config).replay(events)


@pytest.fixture(scope="module")
def result() -> ReplayResult:
    return replay(synthetic_events())


def test_summary_names_arms_outcomes_sources(result: ReplayResult) -> None:
    summary = format_summary(result)

    assert "logreg" in summary
    assert "prior" in summary
    for outcome in JoinOutcome:
        assert outcome.value in summary, outcome
    for source in LabelSource:
        assert source.value in summary, source


def test_summary_shows_counts_and_sections(result: ReplayResult) -> None:
    summary = format_summary(result)

    assert f"{result.impressions:,} impressions" in summary
    assert f"{result.clicks:,} clicks" in summary
    assert "0 invalid lines" in summary
    for heading in ("Served scores", "Pre-learn scores", "Rolling window", "Positive label delay"):
        assert heading in summary, heading
    assert "cost of label delay" in summary
    served = result.evaluation.report()["served"]["model"]
    assert format_metric("normalized_entropy", served["normalized_entropy"]) in summary
    assert format_metric("auc", served["auc"]) in summary


def test_summary_fits_width() -> None:
    long_path = "/data/" + "very-long-directory-name/" * 8 + "events.jsonl.gz"
    summary = format_summary(replay(synthetic_events(impressions=100), path=long_path))

    for line in summary.splitlines():
        assert len(line) <= SUMMARY_WIDTH, line
    assert "events.jsonl.gz" in summary


def test_summary_without_wall_time(result: ReplayResult) -> None:
    assert result.wall_seconds == 0.0

    assert "n/a events/s" in format_summary(result)


def test_summary_with_wall_time() -> None:
    result = replay(synthetic_events(impressions=100))
    result.wall_seconds = 2.0

    summary = format_summary(result)

    assert "2.0 s" in summary
    assert f"{result.events / 2.0:,.0f} events/s" in summary


def test_verdict_model_beats_baseline(result: ReplayResult) -> None:
    served = result.evaluation.report()["served"]
    model_ne = served["model"]["normalized_entropy"]
    baseline_ne = served["baseline"]["normalized_entropy"]
    assert model_ne < baseline_ne

    verdict = normalized_entropy_verdict(result)

    margin = (1 - model_ne / baseline_ne) * 100
    assert verdict.startswith(
        f"logreg beats baseline prior on normalised entropy by {margin:.2f} %"
    )
    assert verdict in format_summary(result)


def test_verdict_prior_does_not_beat_itself() -> None:
    result = replay(synthetic_events(impressions=200), model="prior")

    verdict = normalized_entropy_verdict(result)

    assert verdict.startswith("prior does not beat baseline prior on normalised entropy")


def test_summary_without_positives() -> None:
    result = replay(synthetic_events(clicks=False))

    summary = format_summary(result)

    served = result.evaluation.report()["served"]["model"]
    assert served["normalized_entropy"] is None
    assert served["auc"] is None
    assert re.search(r"normalised entropy +n/a +n/a\n", summary)
    assert re.search(r"AUC +n/a +n/a\n", summary)
    assert "no verdict" in summary
    assert "Positive label delay (0 clicks)" in summary
    assert "p50 n/a" in summary


def test_summary_without_events() -> None:
    summary = format_summary(replay([]))

    assert "0 impressions" in summary
    assert "n/a to n/a" in summary


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (None, "n/a"),
        (0.0, "0.0 s"),
        (42.25, "42.2 s"),
        (516.0, "8.6 min"),
        (7_200.0, "2.0 h"),
        (3 * 86_400.0, "3.0 d"),
    ],
)
def test_format_duration_units(seconds: float | None, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_format_event_time_utc() -> None:
    assert format_event_time(1_714_521_600.25) == "2024-05-01T00:00:00.250Z"
    assert format_event_time(None) == "n/a"


def test_label_delay_quantiles_values() -> None:
    quantiles = label_delay_quantiles([float(n) for n in range(101)])

    assert quantiles == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "max": 100.0}
    assert label_delay_quantiles([]) == {"p50": None, "p90": None, "p99": None, "max": None}
