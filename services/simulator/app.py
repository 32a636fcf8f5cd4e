"""The simulator's closed loop: score impressions through the scorer, click later.

Each step of the loop does, in order:

1. send every click whose time has come to the clicks topic, keyed by
   impression id, as the joiner expects;
2. when the next Poisson arrival is due, draw an impression from the
   population and POST it to the scorer, which logs it to the impressions
   topic with the scores it served;
3. if the scorer accepted it, draw from the true probability whether and
   when the user clicks, and push the click onto a heap ordered by due time;
4. sleep until the next arrival or the next click, whichever comes first.

A scorer without a model returns 503, and a fresh deployment has no model
until the trainer has learned from labelled impressions. So when the scorer
is unavailable (a 5xx status or no response), the simulator does what an
application with a fallback ranking would: it shows the impression anyway
and produces it to the impressions topic itself, without a served score.
The pipeline labels these impressions too, the trainer learns its first
model from them, and the scorer starts serving it.

The scorer, the click sink and the clock are passed in, so tests can run the
loop without a network and without waiting.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import heapq
import http.client
import logging
import threading
import time
import urllib.parse
from typing import Protocol

import numpy as np
import orjson
from kafka import KafkaProducer

from services.simulator.metrics import SimulatorMetrics
from services.simulator.population import Population
from services.simulator.settings import SimulatorSettings
from shared.clock import Clock, SystemClock
from shared.events import Click, Impression, encode

logger = logging.getLogger(__name__)

# The loop wakes at least this often to notice a stop request.
MAX_SLEEP_SECONDS = 0.25
# An arrival more than this late is skipped instead of sent in a burst, so a
# slow scorer lowers the rate instead of receiving a backlog all at once.
MAX_CATCH_UP_SECONDS = 1.0
# Failures of the same kind are logged once per this many seconds.
LOG_EVERY_SECONDS = 30.0


def describe_response_error(payload: bytes) -> str:
    """Return the ``detail`` of a JSON error body, or the start of the raw body."""
    try:
        return str(orjson.loads(payload).get("detail"))
    except (orjson.JSONDecodeError, AttributeError):
        return repr(payload[:200])


class ScoreRejected(Exception):
    """The scorer returned an HTTP error status."""

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        super().__init__(f"scorer returned HTTP {status}: {describe_response_error(body)}")


class Scorer(Protocol):
    """Something that scores one impression, or raises ScoreRejected or OSError."""

    def score(self, impression: Impression) -> None: ...

    def close(self) -> None: ...


class EventSink(Protocol):
    """Destination of clicks once they are due, and of impressions the scorer could not log."""

    def send_click(self, click: Click) -> None: ...

    def send_impression(self, impression: Impression) -> None: ...

    def close(self) -> None: ...


def score_request_body(impression: Impression) -> bytes:
    """Return the JSON body of ``POST /v1/score`` for an impression.

    The scorer takes the ids and the features and stamps the event time
    itself when it logs the impression.
    """
    request = {
        "impression_id": impression.impression_id,
        "user_id": impression.user_id,
        "item_id": impression.item_id,
        "features": impression.features,
    }
    return orjson.dumps(request)


class HttpScorer:
    """POST each impression to ``<scorer_url>/v1/score`` over one keep-alive connection.

    A connection that the server closed between requests is opened again and
    the request sent once more; any other failure raises OSError.
    """

    def __init__(self, base_url: str, timeout_seconds: float) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"invalid scorer URL {base_url!r}; expected http(s)://host[:port]")
        self._connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        self._host = parts.hostname
        self._port = parts.port
        self._timeout = timeout_seconds
        self.path = f"{parts.path.rstrip('/')}/v1/score"
        self._connection: http.client.HTTPConnection | None = None

    def score(self, impression: Impression) -> None:
        body = score_request_body(impression)
        try:
            status, payload = self._post(body)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The server may close an idle keep-alive connection at any time.
            self.close()
            status, payload = self._post(body)
        if not 200 <= status < 300:
            raise ScoreRejected(status, payload)

    def _post(self, body: bytes) -> tuple[int, bytes]:
        if self._connection is None:
            self._connection = self._connection_class(self._host, self._port, timeout=self._timeout)
        try:
            self._connection.request(
                "POST", self.path, body=body, headers={"Content-Type": "application/json"}
            )
            response = self._connection.getresponse()
            payload = response.read()
        except (http.client.HTTPException, OSError):
            self.close()
            raise
        if response.will_close:
            self.close()
        return response.status, payload

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class KafkaEventSink:
    """Produce clicks and unscored impressions keyed by impression id, and count the outcomes."""

    def __init__(
        self,
        producer: KafkaProducer,
        clicks_topic: str,
        impressions_topic: str,
        metrics: SimulatorMetrics,
    ) -> None:
        self.producer = producer
        self.clicks_topic = clicks_topic
        self.impressions_topic = impressions_topic
        self.metrics = metrics
        self._last_error_log = -LOG_EVERY_SECONDS

    def send_click(self, click: Click) -> None:
        future = self.producer.send(
            self.clicks_topic, key=click.impression_id.encode(), value=encode(click)
        )
        future.add_callback(lambda _: self.metrics.clicks.labels(result="sent").inc())
        future.add_errback(self._on_click_error, click.impression_id)

    def send_impression(self, impression: Impression) -> None:
        future = self.producer.send(
            self.impressions_topic,
            key=impression.impression_id.encode(),
            value=encode(impression),
        )
        future.add_errback(self._on_impression_error, impression.impression_id)

    def _on_click_error(self, error: Exception, impression_id: str) -> None:
        self.metrics.clicks.labels(result="failed").inc()
        self._log_error(self.clicks_topic, impression_id, error)

    def _on_impression_error(self, error: Exception, impression_id: str) -> None:
        self.metrics.unscored_impressions_failed.inc()
        self._log_error(self.impressions_topic, impression_id, error)

    def _log_error(self, topic: str, impression_id: str, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= LOG_EVERY_SECONDS:
            self._last_error_log = now
            logger.warning(
                "Producing the record of impression %s to %s failed: %s (further failures are "
                "counted and logged at most every %.0f s)",
                impression_id,
                topic,
                error,
                LOG_EVERY_SECONDS,
            )

    def close(self) -> None:
        self.producer.flush(timeout=10)
        self.producer.close(timeout=10)


@dataclasses.dataclass(order=True, slots=True)
class _PendingClick:
    due_monotonic: float
    sequence: int
    click: Click = dataclasses.field(compare=False)


class ClickSchedule:
    """Clicks waiting for their time, in a heap ordered by due time."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._heap: list[_PendingClick] = []
        self._sequence = 0

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due_monotonic: float, click: Click) -> bool:
        """Schedule a click; return False when the schedule is full and the click is dropped."""
        if len(self._heap) >= self.max_pending:
            return False
        self._sequence += 1
        heapq.heappush(self._heap, _PendingClick(due_monotonic, self._sequence, click))
        return True

    def pop_due(self, now_monotonic: float) -> list[Click]:
        """Remove and return the clicks due at or before ``now_monotonic``, earliest first."""
        due = []
        while self._heap and self._heap[0].due_monotonic <= now_monotonic:
            due.append(heapq.heappop(self._heap).click)
        return due

    def next_due(self) -> float | None:
        """Return the due time of the earliest click, or None when nothing is pending."""
        return self._heap[0].due_monotonic if self._heap else None


@dataclasses.dataclass
class SimulatorStats:
    """Counts of one run, logged at the end and returned for tests."""

    scored: int = 0
    rejected: int = 0
    failed: int = 0
    logged_unscored: int = 0
    clicks_scheduled: int = 0
    clicks_emitted: int = 0
    clicks_dropped: int = 0
    arrivals_skipped: int = 0


class Simulator:
    """The closed loop; ``run`` returns when ``stop`` is set or ``run_seconds`` have passed."""

    def __init__(
        self,
        settings: SimulatorSettings,
        population: Population,
        scorer: Scorer,
        events: EventSink,
        metrics: SimulatorMetrics,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.population = population
        self.scorer = scorer
        self.events = events
        self.metrics = metrics
        self.clock = clock or SystemClock()
        self.schedule = ClickSchedule(settings.max_pending_clicks)
        self.stats = SimulatorStats()
        # Arrival gaps come from their own seeded generator, so changing the
        # rate does not change which users and items the population draws.
        self._arrivals = np.random.default_rng([settings.simulator_seed, 1])
        self._drifted = False
        # Whether the last failed request found the scorer unavailable.
        self._last_unavailable = False
        self._last_failure_log = -LOG_EVERY_SECONDS

    def run(self, stop: threading.Event) -> SimulatorStats:
        """Send impressions and clicks until stopped; return the run's counts."""
        settings = self.settings
        started = self.clock.monotonic()
        next_arrival = started
        logger.info(
            "Simulator started: %.1f impressions/s to %s, drift %s",
            settings.impressions_per_second,
            settings.scorer_url,
            f"after {settings.population_drift_after_seconds:g} s"
            if settings.population_drift_after_seconds
            else "off",
        )

        while not stop.is_set():
            now = self.clock.monotonic()
            elapsed = now - started
            if settings.run_seconds is not None and elapsed >= settings.run_seconds:
                break

            self._emit_due_clicks(now)

            if now >= next_arrival:
                lateness = now - next_arrival
                if lateness > MAX_CATCH_UP_SECONDS:
                    self.stats.arrivals_skipped += 1
                    next_arrival = now
                    lateness = 0.0
                self.metrics.schedule_lag.set(lateness)
                self._serve_one(elapsed)
                next_arrival += self._arrivals.exponential(1.0 / settings.impressions_per_second)
                continue

            wake_at = next_arrival
            next_click = self.schedule.next_due()
            if next_click is not None:
                wake_at = min(wake_at, next_click)
            self.clock.sleep(min(max(wake_at - now, 0.0), MAX_SLEEP_SECONDS))

        self._finish()
        return self.stats

    def _emit_due_clicks(self, now: float) -> None:
        for click in self.schedule.pop_due(now):
            self.events.send_click(click)
            self.stats.clicks_emitted += 1
        self.metrics.pending_clicks.set(len(self.schedule))

    def _serve_one(self, elapsed: float) -> None:
        drifted = self._is_drifted(elapsed)
        shown_at = dt.datetime.fromtimestamp(self.clock.time(), dt.UTC)
        simulated = self.population.draw(shown_at, drifted)
        impression = simulated.impression

        if self._score(impression):
            shown = True
        else:
            shown = self._show_unscored(impression)
        if shown:
            self.metrics.shown_impressions.inc()
            self.metrics.expected_clicks.inc(simulated.true_probability)
            # The scorer stamps the impression's event time while it handles
            # the request, so a click timed from the response never precedes it.
            answered_at = dt.datetime.fromtimestamp(self.clock.time(), dt.UTC)
            self._schedule_click(impression.impression_id, answered_at, simulated.true_probability)

    def _score(self, impression: Impression) -> bool:
        """Send the impression to the scorer; return True when it was scored and logged."""
        started = time.perf_counter()
        try:
            self.scorer.score(impression)
        except ScoreRejected as error:
            self.stats.rejected += 1
            self.metrics.impressions.labels(result="rejected").inc()
            self._log_failure("rejected", impression.impression_id, error)
            self._last_unavailable = error.status >= 500
            return False
        except OSError as error:
            self.stats.failed += 1
            self.metrics.impressions.labels(result="failed").inc()
            self._log_failure("failed", impression.impression_id, error)
            self._last_unavailable = True
            return False
        finally:
            self.metrics.request_duration.observe(time.perf_counter() - started)
        self.stats.scored += 1
        self.metrics.impressions.labels(result="scored").inc()
        return True

    def _show_unscored(self, impression: Impression) -> bool:
        """Produce an impression the scorer could not score; return True if it was shown.

        Only an unavailable scorer (5xx or no response) leads to this: an
        impression the scorer rejected as invalid (4xx) is not shown.
        """
        if not (self.settings.log_unscored_impressions and self._last_unavailable):
            return False
        self.events.send_impression(impression)
        self.stats.logged_unscored += 1
        self.metrics.unscored_impressions.inc()
        return True

    def _schedule_click(
        self, impression_id: str, shown_at: dt.datetime, probability: float
    ) -> None:
        delay = self.population.draw_click_delay(probability)
        if delay is None:
            return
        click = Click(
            impression_id=impression_id, event_time=shown_at + dt.timedelta(seconds=delay)
        )
        if self.schedule.push(self.clock.monotonic() + delay, click):
            self.stats.clicks_scheduled += 1
            return
        self.stats.clicks_dropped += 1
        self.metrics.clicks.labels(result="dropped").inc()

    def _is_drifted(self, elapsed: float) -> bool:
        drift_after = self.settings.population_drift_after_seconds
        if self._drifted or drift_after is None or elapsed < drift_after:
            return self._drifted
        self._drifted = True
        self.metrics.drift_active.set(1)
        logger.info(
            "Population drifted after %.0f s: flipped effects %s, base click rate %s",
            elapsed,
            self.settings.population_drift_effects or "none",
            self.settings.population_drift_base_click_rate or "unchanged",
        )
        return True

    def _log_failure(self, result: str, impression_id: str, error: Exception) -> None:
        now = self.clock.monotonic()
        if now - self._last_failure_log < LOG_EVERY_SECONDS:
            return
        self._last_failure_log = now
        logger.warning(
            "Scoring impression %s %s: %s (%d rejected and %d failed so far; next such message "
            "in %.0f s at the earliest)",
            impression_id,
            result,
            error,
            self.stats.rejected,
            self.stats.failed,
            LOG_EVERY_SECONDS,
        )

    def _finish(self) -> None:
        # Clicks still pending lie in the future; sending them now would put
        # their event time ahead of the broker's clock, so they are dropped.
        # Their impressions become negatives when their windows close.
        dropped = len(self.schedule)
        logger.info(
            "Simulator stopping: %d impressions scored, %d rejected, %d failed, %d produced "
            "unscored; %d clicks sent, %d pending clicks dropped",
            self.stats.scored,
            self.stats.rejected,
            self.stats.failed,
            self.stats.logged_unscored,
            self.stats.clicks_emitted,
            dropped,
        )
