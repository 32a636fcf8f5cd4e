"""The scorer's HTTP API: score impressions with the newest verified model.

``create_app`` builds the FastAPI application with its dependencies: the
model holder and reloader, the served-impression log, the drift monitor and
the metrics. Tests pass their own.

Handlers do little work: validation, one or two ``predict_proba_one`` calls,
a non-blocking put on the log queue and an orjson dump. The single-impression
endpoint is ``async def`` and runs on the event loop, because a thread-pool
hop costs more than its work. The batch endpoint is a plain ``def`` and runs
in the thread pool, so that a large batch does not stall the event loop.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import Counter as Tally
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio.to_thread
import orjson
import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.scorer.drift import DriftMonitor
from services.scorer.logging_sink import (
    PRODUCER_BOOTSTRAP_TIMEOUT_MS,
    PRODUCER_LINGER_MS,
    PRODUCER_MAX_BLOCK_MS,
    DisabledSink,
    ImpressionSink,
    KafkaImpressionSink,
    ServedImpression,
)
from services.scorer.metrics import (
    MULTIPROCESS_DIR_VARIABLE,
    ScorerMetrics,
    exposition_registry,
)
from services.scorer.models import (
    ARMS,
    ArmRouter,
    ModelHolder,
    ModelReloader,
    Scored,
    ScoringError,
    ServingModels,
)
from services.scorer.settings import ScorerSettings
from shared.clock import Clock, SystemClock
from shared.errors import UnavailableError
from shared.events import MAX_FEATURE_NAME_CHARS, Features, Identifier
from shared.kafka import make_producer
from shared.registry import ModelRegistry
from shared.service import make_redis

logger = logging.getLogger(__name__)

SCORE_PATH = "/v1/score"
BATCH_PATH = "/v1/score/batch"
KNOWN_PATHS = frozenset({SCORE_PATH, BATCH_PATH, "/healthz", "/readyz", "/metrics"})
# Upper bound of the batch size setting; the configured limit is checked per request.
MAX_BATCH_SIZE = 10_000
# Handlers store the arms that scored a request here, for the request metrics.
_SCOPE_ARMS = "octr.scored_arms"
_JSON = "application/json"
_RETRY_AFTER_SECONDS = "5"
_MODEL_AGE_REFRESH_SECONDS = 1.0


# Request and response bodies.


class ScoreRequest(BaseModel):
    """One impression to score: the user, the item shown, and the features at that moment."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    impression_id: Identifier | None = Field(
        default=None, description="Caller's id for the impression; a UUID is generated if absent."
    )
    user_id: Identifier | None = Field(
        default=None, description="Decides the champion/challenger arm; never a model feature."
    )
    item_id: Identifier = Field(description="The item shown; the model sees it as 'item_id'.")
    features: Features = Field(
        default_factory=dict,
        description="Feature name to string, number or boolean; at most 256 features.",
    )
    log_impression: StrictBool = Field(
        default=True,
        description="Produce the scored impression to the impressions topic for training.",
    )


class ScoreResponse(BaseModel):
    """The click probability of one impression and the model that computed it."""

    impression_id: str
    probability: float = Field(ge=0.0, le=1.0)
    model_version: str = Field(description="'<registry model name>:<snapshot version>'.")
    arm: Literal["champion", "challenger"]


class BatchScoreRequest(BaseModel):
    """Several impressions scored in one call."""

    model_config = ConfigDict(extra="forbid")

    requests: list[ScoreRequest] = Field(min_length=1, max_length=MAX_BATCH_SIZE)


class BatchScoreResponse(BaseModel):
    """The results, in the order of the requests."""

    results: list[ScoreResponse]


class ErrorResponse(BaseModel):
    """The reason a request failed."""

    detail: str


# Middleware.


class RequestMetricsMiddleware:
    """Count every request by endpoint, arm and status, and time it.

    The metrics are recorded just before the last body chunk is sent, so a
    client that has read its response finds the request counted.
    """

    def __init__(self, app: ASGIApp, metrics: ScorerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        status = 500
        recorded = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, recorded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                recorded = True
                self._record(scope, status, started)
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            if not recorded:
                self._record(scope, status, started)

    def _record(self, scope: Scope, status: int, started: float) -> None:
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"
        self.metrics.request_duration.labels(endpoint=endpoint).observe(
            time.perf_counter() - started
        )
        arms: Tally[str] | None = scope.get(_SCOPE_ARMS)
        if arms and status < 400:
            for arm, count in arms.items():
                self.metrics.requests.labels(endpoint=endpoint, arm=arm, status=str(status)).inc(
                    count
                )
        else:
            self.metrics.requests.labels(endpoint=endpoint, arm="none", status=str(status)).inc()


class _BodyTooLargeError(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=_too_large_message(limit))


def _too_large_message(limit: int) -> str:
    return (
        f"request body is larger than {limit} bytes (ONLINE_CTR_MAX_BODY_BYTES); "
        "send fewer impressions per batch"
    )


class BodySizeLimitMiddleware:
    """Reject request bodies over ``limit`` bytes with 413 before anything parses them.

    A Content-Length over the limit is rejected before the body is read. A
    body without one, or longer than it claims, is counted as it streams in
    and rejected as soon as the count passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            body = orjson.dumps({"detail": _too_large_message(self.limit)})
            response = Response(body, status_code=413, media_type=_JSON)
            await response(scope, receive, send)
            return

        received = 0

        async def receive_with_limit() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLargeError(self.limit)
            return message

        await self.app(scope, receive_with_limit, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _validation_error_handler(request: Request, error: Exception) -> Response:
    """Return 422 with each error's location and message, but never the input.

    FastAPI's default handler echoes the input back, which may be large, or
    bytes that are not UTF-8 and cannot be encoded.
    """
    assert isinstance(error, RequestValidationError)
    return Response(
        orjson.dumps({"detail": _field_errors(error.errors())}),
        status_code=422,
        media_type=_JSON,
    )


# Pydantic's names for the members of the feature value union, which it
# appends to the location of a feature value that matches none of them.
_FEATURE_VALUE_MEMBERS = frozenset({"bool", "int", "float", "str", "constrained-str"})
_FEATURE_VALUE_MESSAGE = "Input should be a string, a finite number or a boolean"


def _field_errors(errors: Sequence[Any]) -> list[dict[str, object]]:
    """Return one error per location, with the union member dropped from feature locations."""
    merged: dict[tuple[object, ...], dict[str, object]] = {}
    for detail in errors:
        loc = tuple(detail.get("loc", ()))
        kind = detail.get("type")
        if len(loc) >= 3 and loc[-3] == "features" and loc[-1] in _FEATURE_VALUE_MEMBERS:
            loc = loc[:-1]
            if str(kind).endswith("_type"):
                # Every member but one reports a type mismatch, so a specific error
                # from another member, such as string_too_long, replaces this one.
                kind, message = "feature_value_type", _FEATURE_VALUE_MESSAGE
            else:
                message = detail.get("msg")
            existing = merged.get(loc)
            if existing is not None and existing["type"] != "feature_value_type":
                continue
            merged[loc] = {"type": kind, "loc": _shortened(loc), "msg": message}
            continue
        merged.setdefault(loc, {"type": kind, "loc": _shortened(loc), "msg": detail.get("msg")})
    return list(merged.values())


def _shortened(loc: tuple[object, ...]) -> list[object]:
    """Return the location with each name over the feature name limit cut to that limit.

    A feature name that is too long is part of its own error's location, and
    the response must not echo up to a megabyte of input back.
    """
    return [
        part[:MAX_FEATURE_NAME_CHARS] + "..."
        if isinstance(part, str) and len(part) > MAX_FEATURE_NAME_CHARS
        else part
        for part in loc
    ]


# Scoring.


class ScoringService:
    """Score validated requests with the served models, and log and monitor what was served."""

    def __init__(
        self,
        settings: ScorerSettings,
        holder: ModelHolder,
        router: ArmRouter,
        sink: ImpressionSink,
        drift: DriftMonitor,
        metrics: ScorerMetrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.holder = holder
        self.router = router
        self.sink = sink
        self.drift = drift
        self.metrics = metrics
        self.clock = clock

    def score(self, requests: list[ScoreRequest], arms: Tally[str]) -> list[dict[str, object]]:
        """Score each request and return the response items; count the arms in ``arms``.

        Raises HTTPException 503 before a champion is loaded, and 500 when a
        model raises.
        """
        models = self.holder.models
        if models.champion is None:
            raise HTTPException(
                status_code=503,
                detail=self.not_ready_message(),
                headers={"Retry-After": _RETRY_AFTER_SECONDS},
            )

        now = self.clock.time()
        scored_requests = []
        for request in requests:
            impression_id = request.impression_id or str(uuid.uuid4())
            # The same dict as Impression.learning_features() of the logged impression.
            features = {"item_id": request.item_id, **request.features}
            try:
                scored = self.router.score(models, features, request.user_id or impression_id)
            except ScoringError as error:
                self.metrics.scoring_errors.labels(arm=error.arm).inc()
                logger.warning("Scoring failed for impression %r: %s", impression_id, error)
                raise HTTPException(status_code=500, detail=str(error)) from None
            scored_requests.append((request, impression_id, features, scored))

        # Only a request that gets its scores is served, so logging and drift
        # tracking wait until every impression of it has scored.
        results = []
        for request, impression_id, features, scored in scored_requests:
            arms[scored.arm] += 1
            self.drift.observe(features, scored.champion_probability)
            if request.log_impression:
                self.sink.offer(self._served(request, impression_id, now, scored))
            results.append(
                {
                    "impression_id": impression_id,
                    "probability": scored.probability,
                    "model_version": scored.model.model_version,
                    "arm": scored.arm,
                }
            )
        return results

    @staticmethod
    def _served(
        request: ScoreRequest, impression_id: str, now: float, scored: Scored
    ) -> ServedImpression:
        return ServedImpression(
            impression_id=impression_id,
            event_time=now,
            user_id=request.user_id,
            item_id=request.item_id,
            features=request.features,
            model_version=scored.model.model_version,
            arm=scored.arm,
            probability=scored.probability,
            baseline_probability=scored.baseline_probability,
            shadow_probability=scored.shadow_probability,
        )

    def not_ready_message(self) -> str:
        """Say why no champion is served yet."""
        slot = self.settings.champion_slot
        failure = self.holder.failures.get("champion")
        if failure is None:
            return (
                f"no verified model of {slot!r} is loaded yet; the scorer loads the newest "
                "snapshot as soon as the trainer publishes one to the registry"
            )
        return (
            f"no verified model of {slot!r} is loaded yet: version {failure.version} was "
            f"rejected ({failure.reason}): {failure.message}"
        )

    def not_ready_reason(self, models: ServingModels, now: float) -> str | None:
        """Return why /readyz fails, or None while a fresh enough champion is served.

        An unreachable registry alone does not make the scorer unready,
        because the loaded champion still scores. Only its age ends readiness.
        """
        champion = models.champion
        max_age = self.settings.max_model_age_seconds
        if champion is None:
            return self.not_ready_message()
        if champion.age_seconds(now) > max_age:
            return (
                f"model {champion.model_version} is {champion.age_seconds(now):.0f} s old, "
                f"older than ONLINE_CTR_MAX_MODEL_AGE_SECONDS={max_age:g}; check that the "
                "trainer is publishing snapshots and that the scorer reaches the registry"
            )
        return None

    def is_ready(self) -> bool:
        """Return whether /readyz returns 200 now."""
        return self.not_ready_reason(self.holder.models, self.clock.time()) is None

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Return whether a fresh enough champion is served, with the details /readyz shows."""
        models = self.holder.models
        now = self.clock.time()
        body: dict[str, object] = {}
        for arm in ARMS:
            model = models.get(arm)
            body[arm] = (
                None
                if model is None
                else {
                    "model_version": model.model_version,
                    "age_seconds": round(model.age_seconds(now), 3),
                }
            )
        body["last_reload_failures"] = {
            arm: {
                "version": failure.version,
                "reason": failure.reason,
                "message": failure.message,
            }
            for arm, failure in self.holder.failures.items()
        }
        registry = self.holder.registry
        body["registry"] = {
            "reachable": registry.reachable,
            "seconds_since_last_success": (
                None
                if registry.last_success_at is None
                else round(max(0.0, now - registry.last_success_at), 3)
            ),
            "error": registry.error,
        }

        reason = self.not_ready_reason(models, now)
        if reason is not None:
            body["reason"] = reason
        body["ready"] = reason is None
        return reason is None, body


# Background work.


class BackgroundRefresher:
    """Refresh the model age and readiness gauges every second, and the drift gauges less often."""

    def __init__(
        self,
        holder: ModelHolder,
        is_ready: Callable[[], bool],
        drift: DriftMonitor,
        metrics: ScorerMetrics,
        drift_refresh_seconds: float,
        clock: Clock,
    ) -> None:
        self.holder = holder
        self.is_ready = is_ready
        self.drift = drift
        self.metrics = metrics
        self.drift_refresh_seconds = drift_refresh_seconds
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh_model_ages(self) -> None:
        """Set each arm's model age and version gauges, and the readiness gauge."""
        now = self.clock.time()
        models = self.holder.models
        for arm in ARMS:
            model = models.get(arm)
            if model is not None:
                self.metrics.model_age.labels(arm=arm).set(model.age_seconds(now))
                self.metrics.model_version.labels(arm=arm).set(model.version)
        self.metrics.ready.set(1 if self.is_ready() else 0)

    def refresh_drift(self) -> None:
        """Recompute the drift gauges against the champion's reference profile."""
        champion = self.holder.models.champion
        self.drift.refresh(champion.metadata.reference if champion else None)

    def start(self) -> None:
        """Start the refresher thread."""
        self._thread = threading.Thread(target=self._run, name="metrics-refresh", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout_s`` for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        next_drift = self.clock.monotonic() + self.drift_refresh_seconds
        while not self._stop.wait(_MODEL_AGE_REFRESH_SECONDS):
            try:
                self.refresh_model_ages()
                if self.clock.monotonic() >= next_drift:
                    self.refresh_drift()
                    next_drift = self.clock.monotonic() + self.drift_refresh_seconds
            # A failed refresh leaves stale gauges, which is better than no refreshes.
            except Exception:
                logger.exception("Refreshing the model and drift gauges failed")


# The application.


def create_app(
    settings: ScorerSettings,
    *,
    registry: ModelRegistry | None = None,
    holder: ModelHolder | None = None,
    sink: ImpressionSink | None = None,
    metrics_registry: CollectorRegistry | None = None,
    clock: Clock | None = None,
) -> FastAPI:
    """Build the scorer application.

    Without ``registry`` and ``holder``, the registry is built from the
    settings and its newest snapshots are loaded and reloaded. With only a
    ``holder``, its models are served as they are, which tests and
    benchmarks use. Without ``sink``, impressions go to Kafka when
    ``settings.log_impressions`` is true.
    """
    clock = clock or SystemClock()
    metrics_registry = metrics_registry or CollectorRegistry()
    metrics = ScorerMetrics(metrics_registry)
    _export_thresholds(metrics, settings)

    owns_registry = registry is None and holder is None
    if registry is None and holder is None:
        registry = ModelRegistry(
            make_redis(settings),
            settings.verification_keys(),
            namespace=settings.registry_namespace,
            allow_other_river=settings.allow_other_river_version,
        )
    holder = holder or ModelHolder()
    reloader = None
    if registry is not None:
        slots = {"champion": settings.champion_slot}
        if settings.serves_challenger:
            slots["challenger"] = settings.challenger_slot
        reloader = ModelReloader(
            registry, holder, slots, metrics, settings.reload_poll_interval_seconds, clock
        )
    sink = sink or _default_sink(settings, metrics, clock)
    drift = DriftMonitor(settings.drift_window_size, settings.drift_detector_delta, metrics)
    router = ArmRouter(
        settings.challenger_share, settings.shadow_mode, settings.challenger_split_salt, metrics
    )
    service = ScoringService(settings, holder, router, sink, drift, metrics, clock)
    refresher = BackgroundRefresher(
        holder, service.is_ready, drift, metrics, settings.drift_refresh_seconds, clock
    )
    refresher.refresh_model_ages()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sink.start()
        if reloader is not None:
            await anyio.to_thread.run_sync(_load_initial_models, reloader)
            reloader.start()
        refresher.start()
        logger.info("Scorer worker %d ready to serve", os.getpid())
        yield
        refresher.stop()
        if reloader is not None:
            reloader.stop()
        if owns_registry and registry is not None:
            registry.client.close()
        await anyio.to_thread.run_sync(sink.close)
        if os.environ.get(MULTIPROCESS_DIR_VARIABLE):
            prometheus_multiprocess.mark_process_dead(os.getpid())

    app = FastAPI(
        title="online-ctr scorer",
        summary="Click probabilities from the newest verified model.",
        version="1",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.holder = holder
    app.state.reloader = reloader
    app.state.sink = sink
    app.state.drift = drift
    app.state.metrics = metrics
    app.state.metrics_registry = metrics_registry
    app.state.refresher = refresher
    app.state.service = service

    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_middleware(BodySizeLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    _add_routes(app, service, metrics_registry)
    return app


def _add_routes(app: FastAPI, service: ScoringService, metrics_registry: CollectorRegistry) -> None:
    errors = {
        413: {"model": ErrorResponse, "description": "The body exceeds the configured size."},
        500: {"model": ErrorResponse, "description": "The model failed on these features."},
        503: {"model": ErrorResponse, "description": "No verified model is loaded yet."},
    }
    max_batch_size = service.settings.max_batch_size

    @app.post(SCORE_PATH, response_model=ScoreResponse, responses=errors)
    async def score(body: ScoreRequest, request: Request) -> Response:
        """Score one impression."""
        arms: Tally[str] = Tally()
        request.scope[_SCOPE_ARMS] = arms
        (result,) = service.score([body], arms)
        return Response(orjson.dumps(result), media_type=_JSON)

    @app.post(BATCH_PATH, response_model=BatchScoreResponse, responses=errors)
    def score_batch(body: BatchScoreRequest, request: Request) -> Response:
        """Score several impressions; each is split, logged and monitored as if sent alone."""
        if len(body.requests) > max_batch_size:
            raise RequestValidationError(
                [
                    {
                        "type": "too_long",
                        "loc": ("body", "requests"),
                        "msg": f"List should have at most {max_batch_size} items "
                        f"(ONLINE_CTR_MAX_BATCH_SIZE), not {len(body.requests)}",
                    }
                ]
            )
        arms: Tally[str] = Tally()
        request.scope[_SCOPE_ARMS] = arms
        results = service.score(body.requests, arms)
        return Response(orjson.dumps({"results": results}), media_type=_JSON)

    @app.get("/healthz")
    async def healthz() -> Response:
        """Liveness: the process serves HTTP."""
        return Response(b'{"status":"ok"}', media_type=_JSON)

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: 200 while a verified champion younger than the maximum age is served."""
        ready, body = service.readiness()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text exposition of every scorer metric."""
        payload = generate_latest(exposition_registry(metrics_registry))
        return Response(payload, media_type=CONTENT_TYPE_LATEST)


def _export_thresholds(metrics: ScorerMetrics, settings: ScorerSettings) -> None:
    metrics.max_model_age.set(settings.max_model_age_seconds)
    metrics.psi_threshold.set(settings.psi_threshold)
    metrics.missing_ratio_threshold.set(settings.missing_ratio_threshold)
    metrics.unseen_category_ratio_threshold.set(settings.unseen_category_ratio_threshold)


def _default_sink(settings: ScorerSettings, metrics: ScorerMetrics, clock: Clock) -> ImpressionSink:
    if not settings.log_impressions:
        return DisabledSink()
    return KafkaImpressionSink(
        lambda: make_producer(
            settings,
            max_block_ms=PRODUCER_MAX_BLOCK_MS,
            bootstrap_timeout_ms=PRODUCER_BOOTSTRAP_TIMEOUT_MS,
            linger_ms=PRODUCER_LINGER_MS,
        ),
        settings.topic_impressions,
        settings.log_queue_size,
        metrics,
        clock,
    )


def _load_initial_models(reloader: ModelReloader) -> None:
    """Load the newest snapshots before serving; the reloader thread retries failures."""
    try:
        reloader.check_all()
    except (UnavailableError, redis.RedisError) as error:
        reloader.record_unavailable(error)
        logger.warning(
            "Model registry unavailable at start-up (%s); retrying in the background", error
        )
