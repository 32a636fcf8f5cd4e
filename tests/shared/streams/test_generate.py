"""Tests of the synthetic stream generator and its truth records.

Statistical checks allow four standard errors, so by the normal approximation
a correct generator fails each for about 1 in 16,000 seeds. The seeds are fixed.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
import pydantic
import pytest

from shared.events import Click, Impression
from shared.streams.generate import (
    MAX_DELAY_SECONDS,
    Drift,
    ExponentialDelay,
    GeneratorSettings,
    LognormalDelay,
    TruthRecord,
    bayes_log_loss,
    drift_time_at_fraction,
    generate,
    read_truth,
    write_generated,
)
from shared.streams.recorded import read_events

START = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)


def click_rate_tolerance(probabilities: np.ndarray) -> float:
    """Four standard errors of the mean of independent Bernoulli draws."""
    return 4 * math.sqrt(float(np.sum(probabilities * (1 - probabilities)))) / len(probabilities)


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    settings = GeneratorSettings(impressions=2_000, seed=7, lost_click_share=0.1)

    write_generated(settings, tmp_path / "a.jsonl.gz", tmp_path / "a-truth.jsonl.gz")
    write_generated(settings, tmp_path / "b.jsonl.gz", tmp_path / "b-truth.jsonl.gz")

    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    assert (tmp_path / "a-truth.jsonl.gz").read_bytes() == (
        tmp_path / "b-truth.jsonl.gz"
    ).read_bytes()


def test_different_seed_gives_different_stream(tmp_path: Path) -> None:
    write_generated(
        GeneratorSettings(impressions=500, seed=1), tmp_path / "a.jsonl", tmp_path / "a.truth"
    )
    write_generated(
        GeneratorSettings(impressions=500, seed=2), tmp_path / "b.jsonl", tmp_path / "b.truth"
    )

    assert (tmp_path / "a.jsonl").read_bytes() != (tmp_path / "b.jsonl").read_bytes()


def test_events_ordered_and_match_truth() -> None:
    settings = GeneratorSettings(impressions=3_000, seed=3, base_click_rate=0.2)

    events, truth = generate(settings)
    events = list(events)

    impressions = [event for event in events if isinstance(event, Impression)]
    clicks = [event for event in events if isinstance(event, Click)]
    assert len(impressions) == settings.impressions
    assert impressions[0].event_time == START
    assert [event.impression_id for event in impressions] == [
        record.impression_id for record in truth
    ]
    times = [event.event_time for event in events]
    assert times == sorted(times)

    impression_times = {event.impression_id: event.event_time for event in impressions}
    delays = {record.impression_id: record.click_delay_seconds for record in truth}
    assert len(clicks) == sum(record.clicked for record in truth)
    for click in clicks:
        observed = (click.event_time - impression_times[click.impression_id]).total_seconds()
        assert observed == pytest.approx(delays[click.impression_id], abs=1e-6)


def test_impression_features() -> None:
    events, _ = generate(GeneratorSettings(impressions=10, seed=4, users=5, items=3, categories=2))
    impression = next(events)

    assert impression.user_id in {f"u{index}" for index in range(5)}
    assert impression.item_id in {f"i{index}" for index in range(3)}
    assert set(impression.features) == {"category", "price", "user_segment"}
    assert impression.features["category"] in {"c0", "c1"}
    assert isinstance(impression.features["price"], float)
    assert impression.features["price"] > 0


def test_arrival_rate_matches_setting() -> None:
    settings = GeneratorSettings(impressions=20_000, seed=5, impressions_per_second=50.0)

    events, _ = generate(settings)
    last_time = max(event.event_time for event in events if isinstance(event, Impression))

    span_seconds = (last_time - START).total_seconds()
    expected_seconds = (settings.impressions - 1) / settings.impressions_per_second
    # The span is a sum of exponential gaps, so its standard deviation is sqrt(n) / rate.
    tolerance = 4 * math.sqrt(settings.impressions) / settings.impressions_per_second
    assert span_seconds == pytest.approx(expected_seconds, abs=tolerance)


def test_click_rate_matches_true_probability() -> None:
    _, truth = generate(GeneratorSettings(impressions=50_000, seed=6))

    probabilities = np.array([record.true_probability for record in truth])
    click_rate = np.mean([record.clicked for record in truth])

    assert click_rate == pytest.approx(
        probabilities.mean(), abs=click_rate_tolerance(probabilities)
    )


def test_feature_effects_spread_probabilities() -> None:
    _, truth = generate(GeneratorSettings(impressions=2_000, seed=6))
    _, flat_truth = generate(
        GeneratorSettings(
            impressions=2_000,
            seed=6,
            item_effect_sd=0,
            category_effect_sd=0,
            segment_effect_sd=0,
            price_effect=0,
        )
    )

    assert np.std([record.true_probability for record in truth]) > 0.01
    flat_probabilities = [record.true_probability for record in flat_truth]
    assert flat_probabilities == pytest.approx([0.05] * len(flat_truth))


def test_exponential_delay_mean() -> None:
    settings = GeneratorSettings(
        impressions=20_000, seed=8, base_click_rate=0.3, delay=ExponentialDelay(mean_seconds=120.0)
    )

    _, truth = generate(settings)
    delays = np.array([record.click_delay_seconds for record in truth if record.clicked])

    # An exponential's standard deviation equals its mean.
    assert delays.mean() == pytest.approx(120.0, abs=4 * 120.0 / math.sqrt(len(delays)))
    assert delays.min() >= 0


def test_lognormal_delay_median_and_sigma() -> None:
    settings = GeneratorSettings(
        impressions=20_000,
        seed=9,
        base_click_rate=0.3,
        delay=LognormalDelay(median_seconds=600.0, sigma=1.5),
    )

    _, truth = generate(settings)
    log_delays = np.log([record.click_delay_seconds for record in truth if record.clicked])

    standard_error = 1.5 / math.sqrt(len(log_delays))
    assert log_delays.mean() == pytest.approx(math.log(600.0), abs=4 * standard_error)
    assert np.exp(np.median(log_delays)) == pytest.approx(600.0, rel=0.1)
    assert log_delays.std() == pytest.approx(1.5, rel=0.05)


def test_drift_changes_base_rate() -> None:
    drift_at = START + dt.timedelta(seconds=1_000)
    settings = GeneratorSettings(
        impressions=20_000,
        seed=10,
        impressions_per_second=10.0,
        base_click_rate=0.02,
        drift=Drift(at=drift_at, base_click_rate=0.2),
    )

    events, truth = generate(settings)
    times = {
        event.impression_id: event.event_time for event in events if isinstance(event, Impression)
    }
    before = [record for record in truth if times[record.impression_id] < drift_at]
    after = [record for record in truth if times[record.impression_id] >= drift_at]

    assert len(before) > 5_000
    assert len(after) > 5_000
    rate_before = np.mean([record.clicked for record in before])
    rate_after = np.mean([record.clicked for record in after])
    assert rate_before < 0.05
    assert rate_after > 0.12
    mean_before = np.mean([record.true_probability for record in before])
    mean_after = np.mean([record.true_probability for record in after])
    assert rate_after == pytest.approx(
        mean_after, abs=click_rate_tolerance(np.array([r.true_probability for r in after]))
    )
    assert mean_before < 0.05 < 0.12 < mean_after


def test_drift_flips_price_effect() -> None:
    drift_at = START + dt.timedelta(seconds=500)
    settings = GeneratorSettings(
        impressions=10_000,
        seed=11,
        item_effect_sd=0,
        category_effect_sd=0,
        segment_effect_sd=0,
        price_effect=-1.0,
        drift=Drift(at=drift_at, flip_effects=frozenset({"price"})),
    )

    events, truth = generate(settings)
    impressions = [event for event in events if isinstance(event, Impression)]
    prices = np.array([event.features["price"] for event in impressions])
    probabilities = np.array([record.true_probability for record in truth])
    after = np.array([event.event_time >= drift_at for event in impressions])

    assert np.corrcoef(prices[~after], probabilities[~after])[0, 1] < -0.5
    assert np.corrcoef(prices[after], probabilities[after])[0, 1] > 0.5


def test_lost_clicks_never_arrive() -> None:
    settings = GeneratorSettings(
        impressions=20_000, seed=12, base_click_rate=0.3, lost_click_share=0.25
    )

    events, truth = generate(settings)
    click_ids = {event.impression_id for event in events if isinstance(event, Click)}

    clicked = [record for record in truth if record.clicked]
    lost = [record for record in clicked if record.click_lost]
    share = len(lost) / len(clicked)
    assert share == pytest.approx(0.25, abs=4 * math.sqrt(0.25 * 0.75 / len(clicked)))
    assert all(record.click_delay_seconds is None for record in lost)
    assert click_ids == {record.impression_id for record in clicked if not record.click_lost}


def test_write_generated_summary_and_truth(tmp_path: Path) -> None:
    settings = GeneratorSettings(
        impressions=1_000, seed=13, base_click_rate=0.2, lost_click_share=0.5
    )
    out = tmp_path / "stream.jsonl.gz"
    truth_out = tmp_path / "truth.jsonl"

    summary = write_generated(settings, out, truth_out)

    truth = read_truth(truth_out)
    events = list(read_events(out))
    assert summary.impressions == 1_000
    assert summary.clicks == sum(record.click_delay_seconds is not None for record in truth)
    assert summary.details["lost_clicks"] == sum(record.click_lost for record in truth)
    assert summary.details["lost_clicks"] > 0
    assert summary.bytes_written == out.stat().st_size
    assert len(events) == summary.impressions + summary.clicks
    _, expected_truth = generate(settings)
    assert truth == expected_truth


def test_bayes_log_loss_of_fair_coin() -> None:
    truth = [
        TruthRecord("a", 0.5, True, 1.0),
        TruthRecord("b", 0.5, False, None),
    ]

    loss = bayes_log_loss(truth)

    assert loss.expected == pytest.approx(math.log(2))
    assert loss.realised == pytest.approx(math.log(2))


def test_bayes_log_loss_realised_uses_labels() -> None:
    truth = [
        TruthRecord("a", 0.9, True, 1.0),
        TruthRecord("b", 0.2, True, 1.0),
        TruthRecord("c", 0.2, False, None),
    ]

    loss = bayes_log_loss(truth)

    def entropy(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    assert loss.expected == pytest.approx((entropy(0.9) + 2 * entropy(0.2)) / 3)
    assert loss.realised == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.8)) / 3)


def test_bayes_log_loss_realised_near_expected() -> None:
    _, truth = generate(GeneratorSettings(impressions=50_000, seed=14))

    loss = bayes_log_loss(truth)

    assert loss.realised == pytest.approx(loss.expected, rel=0.05)


def test_bayes_log_loss_rejects_empty_truth() -> None:
    with pytest.raises(ValueError, match="truth is empty"):
        bayes_log_loss([])


@pytest.mark.parametrize(
    "settings",
    [
        {"impressions": 0},
        {"base_click_rate": 1.0},
        {"unknown_setting": 1},
        {"delay": {"kind": "exponential", "mean_seconds": 0}},
        {"delay": {"kind": "gamma", "mean_seconds": 5}},
        {"drift": {"at": "2024-01-01T00:10:00Z"}},
        {"drift": {"at": "2024-01-01T00:10:00", "base_click_rate": 0.1}},
        {"drift": {"at": "2024-01-01T00:10:00Z", "flip_effects": ["colour"]}},
        {"start_time": "2024-01-01T00:00:00"},
        {"impressions": 1_000_000, "impressions_per_second": 0.001},
    ],
)
def test_settings_reject_invalid_values(settings: dict) -> None:
    with pytest.raises(pydantic.ValidationError):
        GeneratorSettings.model_validate(settings)


def test_settings_accept_delay_as_dict() -> None:
    settings = GeneratorSettings.model_validate(
        {"delay": {"kind": "lognormal", "median_seconds": 60, "sigma": 0.5}}
    )

    assert settings.delay == LognormalDelay(median_seconds=60, sigma=0.5)


def test_write_generated_without_truth(tmp_path: Path) -> None:
    summary = write_generated(GeneratorSettings(impressions=100, seed=15), tmp_path / "s.jsonl")

    assert summary.impressions == 100
    assert list(tmp_path.iterdir()) == [tmp_path / "s.jsonl"]


def test_drift_time_at_fraction_splits_stream() -> None:
    base = GeneratorSettings(impressions=10_000, seed=16, impressions_per_second=20.0)
    drift_at = drift_time_at_fraction(base, 0.25)
    settings = base.model_copy(update={"drift": Drift(at=drift_at, base_click_rate=0.5)})

    events, _ = generate(settings)
    times = [event.event_time for event in events if isinstance(event, Impression)]

    assert drift_at == START + dt.timedelta(seconds=0.25 * 9_999 / 20.0)
    share_before = sum(time < drift_at for time in times) / len(times)
    assert share_before == pytest.approx(0.25, abs=0.03)


def test_drift_time_rejects_fraction_outside_range() -> None:
    with pytest.raises(ValueError, match="outside"):
        drift_time_at_fraction(GeneratorSettings(), 1.5)


def test_click_model_keeps_traffic_and_delays() -> None:
    low = GeneratorSettings(impressions=2_000, seed=17, base_click_rate=0.05)
    high = low.model_copy(update={"base_click_rate": 0.5, "lost_click_share": 0.3})

    low_events, low_truth = generate(low)
    high_events, high_truth = generate(high)
    low_impressions = [event for event in low_events if isinstance(event, Impression)]
    high_impressions = [event for event in high_events if isinstance(event, Impression)]

    assert low_impressions == high_impressions
    both_delivered = [
        (low_record.click_delay_seconds, high_record.click_delay_seconds)
        for low_record, high_record in zip(low_truth, high_truth, strict=True)
        if low_record.click_delay_seconds is not None
        and high_record.click_delay_seconds is not None
    ]
    assert both_delivered
    for low_delay, high_delay in both_delivered:
        assert low_delay == high_delay


def test_heavy_tailed_delays_are_capped() -> None:
    settings = GeneratorSettings(
        impressions=2_000,
        seed=18,
        base_click_rate=0.5,
        delay=LognormalDelay(median_seconds=86_400.0, sigma=20.0),
    )

    events, truth = generate(settings)

    delays = [r.click_delay_seconds for r in truth if r.click_delay_seconds is not None]
    assert max(delays) == MAX_DELAY_SECONDS
    assert sum(isinstance(event, Click) for event in events) == len(delays)
