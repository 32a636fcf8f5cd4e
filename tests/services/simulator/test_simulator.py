"""The traffic simulator: population, click schedule, closed loop and HTTP client."""

from __future__ import annotations

import datetime as dt
import http.server
import threading
from collections.abc import Iterator

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry

from services.simulator.app import (
    ClickSchedule,
    HttpScorer,
    ScoreRejected,
    Simulator,
    score_request_body,
)
from services.simulator.metrics import SimulatorMetrics
from services.simulator.population import Population
from services.simulator.settings import SimulatorSettings
from shared.clock import ManualClock
from shared.events import Click, Impression, parse_impression

START = 1_700_000_000.0


def make_settings(**overrides) -> SimulatorSettings:
    return SimulatorSettings(metrics_port=0, **overrides)


class FakeScorer:
    """Accept every impression, or raise the given error for all of them."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.impressions: list[Impression] = []

    def score(self, impression: Impression) -> None:
        if self.error is not None:
            raise self.error
        self.impressions.append(impression)

    def close(self) -> None:
        pass


class FakeSink:
    """Record each click with the clock's time when it was sent, and each unscored impression."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, Click]] = []
        self.impressions: list[Impression] = []

    def send_click(self, click: Click) -> None:
        self.sent.append((self.clock.time(), click))

    def send_impression(self, impression: Impression) -> None:
        self.impressions.append(impression)

    def close(self) -> None:
        pass


def run_simulator(settings: SimulatorSettings, scorer=None):
    clock = ManualClock(START)
    sink = FakeSink(clock)
    registry = CollectorRegistry()
    simulator = Simulator(
        settings,
        Population(settings, "test"),
        scorer or FakeScorer(),
        sink,
        SimulatorMetrics(registry),
        clock,
    )
    stats = simulator.run(threading.Event())
    return simulator, sink, registry, stats


# Population.


def test_population_same_seed_same_draws() -> None:
    settings = make_settings(simulator_seed=7)
    when = dt.datetime.fromtimestamp(START, dt.UTC)
    first, second = Population(settings, "a"), Population(settings, "a")

    draws = [(first.draw(when, False), second.draw(when, False)) for _ in range(20)]

    assert all(one == other for one, other in draws)
    assert Population(make_settings(simulator_seed=8), "a").draw(when, False) != draws[0][0]


def test_population_probabilities_are_probabilities() -> None:
    population = Population(make_settings(), "p")
    when = dt.datetime.fromtimestamp(START, dt.UTC)
    probabilities = [population.draw(when, drifted=False).true_probability for _ in range(2000)]

    assert all(0.0 < p < 1.0 for p in probabilities)
    assert 0.02 < float(np.mean(probabilities)) < 0.15


def test_population_impressions_are_valid_events() -> None:
    population = Population(make_settings(), "valid")
    when = dt.datetime.fromtimestamp(START, dt.UTC)
    impressions = [population.draw(when, drifted=flag).impression for flag in (False, True) * 50]

    for impression in impressions:
        assert parse_impression(orjson.dumps(impression.model_dump(mode="json"))) == impression
    assert len({impression.impression_id for impression in impressions}) == len(impressions)


def test_population_drift_changes_behaviour_and_mix() -> None:
    settings = make_settings(
        population_drift_new_item_share=0.2, population_drift_missing_price_share=0.1
    )
    population = Population(settings, "drift")
    when = dt.datetime.fromtimestamp(START, dt.UTC)
    before = [population.draw(when, drifted=False) for _ in range(3000)]
    after = [population.draw(when, drifted=True) for _ in range(3000)]

    new_before = sum(s.impression.features["category"].startswith("new") for s in before)
    new_after = sum(s.impression.features["category"].startswith("new") for s in after)
    missing_after = sum("price" not in s.impression.features for s in after)
    assert new_before == 0
    assert 400 < new_after < 800
    assert 150 < missing_after < 450
    assert all("price" in s.impression.features for s in before)

    # Item and category effects are negated after the drift.
    item = (
        population.before.item_effects[0]
        + population.before.category_effects[population.before.item_categories[0]]
    )
    drifted = (
        population.after.item_effects[0]
        + population.after.category_effects[population.after.item_categories[0]]
    )
    assert drifted == pytest.approx(-item)


def test_click_delay_follows_true_probability() -> None:
    population = Population(make_settings(click_delay_max_seconds=60.0), "delay")
    draws = [population.draw_click_delay(0.3) for _ in range(20_000)]
    delays = [delay for delay in draws if delay is not None]

    assert len(delays) / len(draws) == pytest.approx(0.3, abs=0.02)
    assert max(delays) <= 60.0
    assert float(np.median(delays)) == pytest.approx(8.0, rel=0.15)
    assert all(population.draw_click_delay(0.0) is None for _ in range(1000))


# Click schedule.


def test_schedule_pops_due_clicks_in_order() -> None:
    schedule = ClickSchedule(max_pending=10)
    when = dt.datetime.fromtimestamp(START, dt.UTC)
    for due, name in ((5.0, "c"), (1.0, "a"), (3.0, "b"), (9.0, "d")):
        schedule.push(due, Click(impression_id=name, event_time=when))

    assert [click.impression_id for click in schedule.pop_due(5.0)] == ["a", "b", "c"]
    assert schedule.next_due() == 9.0
    assert schedule.pop_due(8.9) == []
    assert len(schedule) == 1


def test_schedule_drops_clicks_when_full() -> None:
    schedule = ClickSchedule(max_pending=2)
    when = dt.datetime.fromtimestamp(START, dt.UTC)

    assert schedule.push(1.0, Click(impression_id="a", event_time=when))
    assert schedule.push(2.0, Click(impression_id="b", event_time=when))
    assert not schedule.push(3.0, Click(impression_id="c", event_time=when))
    assert len(schedule) == 2


# Closed loop.


def test_loop_rate_and_clicks() -> None:
    settings = make_settings(impressions_per_second=20.0, run_seconds=120.0)
    simulator, sink, registry, stats = run_simulator(settings)

    assert stats.scored == pytest.approx(2400, rel=0.1)
    assert stats.failed == 0
    assert registry.get_sample_value(
        "octr_simulator_impressions_total", {"result": "scored"}
    ) == float(stats.scored)
    # Clicks still pending at the end are dropped, so sent <= scheduled.
    assert 0 < stats.clicks_emitted <= stats.clicks_scheduled
    expected = registry.get_sample_value("octr_simulator_expected_clicks_total")
    assert stats.clicks_scheduled == pytest.approx(expected, rel=0.25)


def test_loop_sends_each_click_at_its_event_time() -> None:
    settings = make_settings(impressions_per_second=10.0, run_seconds=60.0)
    simulator, sink, _, _ = run_simulator(settings)
    shown = {imp.impression_id: imp for imp in simulator.scorer.impressions}

    assert sink.sent
    for sent_at, click in sink.sent:
        impression = shown[click.impression_id]
        assert click.event_time >= impression.event_time
        # The loop sleeps until the next arrival or click, so a click leaves
        # at its time, give or take one wake-up.
        assert click.ts <= sent_at + 1e-6
        assert sent_at - click.ts < 0.3


def test_loop_shows_unscored_impressions_when_scorer_down() -> None:
    settings = make_settings(impressions_per_second=10.0, run_seconds=60.0)
    _, sink, registry, stats = run_simulator(settings, FakeScorer(OSError("refused")))

    assert stats.scored == 0
    assert stats.failed > 300
    assert stats.logged_unscored == stats.failed
    assert len(sink.impressions) == stats.failed
    assert all(impression.served is None for impression in sink.impressions)
    shown = {impression.impression_id for impression in sink.impressions}
    assert sink.sent
    assert {click.impression_id for _, click in sink.sent} <= shown
    assert registry.get_sample_value(
        "octr_simulator_impressions_total", {"result": "failed"}
    ) == float(stats.failed)
    assert registry.get_sample_value("octr_simulator_unscored_impressions_total") == float(
        stats.failed
    )


def test_loop_shows_unscored_impressions_on_503() -> None:
    settings = make_settings(impressions_per_second=10.0, run_seconds=10.0)
    scorer = FakeScorer(ScoreRejected(503, b'{"detail": "no model loaded"}'))
    _, sink, _, stats = run_simulator(settings, scorer)

    assert stats.rejected > 50
    assert len(sink.impressions) == stats.rejected


def test_loop_drops_impressions_rejected_as_invalid() -> None:
    settings = make_settings(impressions_per_second=10.0, run_seconds=30.0)
    scorer = FakeScorer(ScoreRejected(422, b'{"detail": "invalid"}'))
    _, sink, _, stats = run_simulator(settings, scorer)

    assert stats.rejected > 200
    assert sink.impressions == []
    assert sink.sent == []


def test_loop_without_fallback_shows_nothing() -> None:
    settings = make_settings(
        impressions_per_second=10.0, run_seconds=30.0, log_unscored_impressions=False
    )
    _, sink, _, stats = run_simulator(settings, FakeScorer(OSError("refused")))

    assert stats.failed > 200
    assert sink.impressions == []
    assert sink.sent == []


def test_loop_drifts_at_set_time() -> None:
    settings = make_settings(
        impressions_per_second=20.0, run_seconds=40.0, population_drift_after_seconds=20.0
    )
    simulator, _, registry, _ = run_simulator(settings)
    impressions = simulator.scorer.impressions
    drift_at = START + 20.0

    before = [imp for imp in impressions if imp.ts < drift_at]
    after = [imp for imp in impressions if imp.ts >= drift_at]
    assert before and after
    assert not any(imp.features["category"].startswith("new") for imp in before)
    assert any(imp.features["category"].startswith("new") for imp in after)
    assert registry.get_sample_value("octr_simulator_drift_active") == 1.0


# HTTP client against a loopback server.


class _ScoreHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set[int] = set()
    bodies: list[bytes] = []
    status = 200

    def do_POST(self) -> None:  # noqa: N802 - the http.server interface
        length = int(self.headers["Content-Length"])
        type(self).bodies.append(self.rfile.read(length))
        type(self).connections.add(id(self.connection))
        body = b'{"detail": "bad"}' if self.status >= 400 else b'{"probability": 0.1}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def score_server() -> Iterator[tuple[str, type[_ScoreHandler]]]:
    handler = type("Handler", (_ScoreHandler,), {"connections": set(), "bodies": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_http_scorer_keeps_connection_alive(score_server) -> None:
    url, handler = score_server
    scorer = HttpScorer(url, timeout_seconds=2.0)
    population = Population(make_settings(), "http")
    when = dt.datetime.fromtimestamp(START, dt.UTC)
    impressions = [population.draw(when, drifted=False).impression for _ in range(5)]

    for impression in impressions:
        scorer.score(impression)
    scorer.close()

    assert len(handler.bodies) == 5
    assert len(handler.connections) == 1
    assert orjson.loads(handler.bodies[0]) == {
        "impression_id": impressions[0].impression_id,
        "user_id": impressions[0].user_id,
        "item_id": impressions[0].item_id,
        "features": impressions[0].features,
    }


def test_http_scorer_raises_on_error_status(score_server) -> None:
    url, handler = score_server
    handler.status = 422
    scorer = HttpScorer(url, timeout_seconds=2.0)
    impression = (
        Population(make_settings(), "err")
        .draw(dt.datetime.fromtimestamp(START, dt.UTC), drifted=False)
        .impression
    )

    with pytest.raises(ScoreRejected, match="HTTP 422: bad"):
        scorer.score(impression)


def test_http_scorer_unreachable_raises_oserror() -> None:
    scorer = HttpScorer("http://127.0.0.1:9", timeout_seconds=0.5)
    impression = (
        Population(make_settings(), "down")
        .draw(dt.datetime.fromtimestamp(START, dt.UTC), drifted=False)
        .impression
    )

    with pytest.raises(OSError):
        scorer.score(impression)


def test_settings_reject_unknown_drift_effect() -> None:
    with pytest.raises(ValueError, match="unknown effects"):
        make_settings(population_drift_flip_effects="item,colour")


def test_score_request_body_fits_scorer_schema() -> None:
    from services.scorer.app import ScoreRequest

    population = Population(make_settings(), "schema")
    when = dt.datetime.fromtimestamp(START, dt.UTC)
    for drifted in (False, True) * 20:
        impression = population.draw(when, drifted).impression

        request = ScoreRequest.model_validate_json(score_request_body(impression))

        assert request.impression_id == impression.impression_id
        assert request.features == impression.features
