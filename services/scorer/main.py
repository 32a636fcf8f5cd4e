"""Entry point of ``online-ctr scorer``: serve the HTTP API with uvicorn.

With one worker the application runs in this process. With more, uvicorn
starts that many worker processes, which share the listening socket. Each
builds its own application from the ``ONLINE_CTR_*`` environment, loads its
own model, subscribes to announcements and logs through its own producer.
Their metrics are combined with prometheus-client's multiprocess mode, in a
directory named by ``PROMETHEUS_MULTIPROC_DIR``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile

import uvicorn
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from services.scorer.app import create_app
from services.scorer.metrics import MULTIPROCESS_DIR_VARIABLE, exposition_registry
from services.scorer.settings import ScorerSettings
from shared.errors import ConfigError
from shared.logs import configure_logging
from shared.service import start_metrics
from shared.settings import load_settings

logger = logging.getLogger(__name__)

WORKER_APP = "services.scorer.main:create_worker_app"
GRACEFUL_SHUTDOWN_SECONDS = 10


def create_worker_app() -> FastAPI:
    """Build the application inside a uvicorn worker process, from the environment."""
    configure_logging()
    return create_app(load_settings(ScorerSettings))


def run(settings: ScorerSettings) -> int:
    """Serve until SIGTERM or SIGINT; return 0 after a graceful stop, 1 if start-up failed."""
    settings.verification_keys()
    if settings.workers == 1:
        return _run_in_process(settings)
    return _run_workers(settings)


def _uvicorn_options(settings: ScorerSettings) -> dict[str, object]:
    return {
        "host": settings.http_host,
        "port": settings.http_port,
        # The root logger is configured by the command line or the worker factory.
        "log_config": None,
        # Requests are counted in the metrics; a line per request would cost more than scoring.
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_SECONDS,
        "server_header": False,
    }


def _note_stop_signal(signum: int, frame: object) -> None:
    logger.debug("Received %s after the server stopped", signal.Signals(signum).name)


def _run_in_process(settings: ScorerSettings) -> int:
    registry = CollectorRegistry()
    app = create_app(settings, metrics_registry=registry)
    stop_metrics = start_metrics(registry, settings)
    server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_options(settings)))
    # After a graceful stop, uvicorn puts back the handlers it found and raises
    # the stop signal again. With the default handler, the process would die by
    # that signal instead of returning an exit status.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _note_stop_signal)
    logger.info("Scorer listening on %s:%d", settings.http_host, settings.http_port)
    try:
        server.run()
    finally:
        if stop_metrics is not None:
            stop_metrics()
    logger.info("Scorer stopped")
    return 0 if server.started else 1


def _run_workers(settings: ScorerSettings) -> int:
    from_environment = load_settings(ScorerSettings)
    if from_environment != settings:
        raise ConfigError(
            f"with ONLINE_CTR_WORKERS={settings.workers}, each worker process reads its settings "
            "from the ONLINE_CTR_* environment, but the settings passed to run() differ from it; "
            "set them as environment variables instead"
        )

    created_dir = None
    if not os.environ.get(MULTIPROCESS_DIR_VARIABLE):
        created_dir = tempfile.mkdtemp(prefix="online-ctr-scorer-metrics-")
        os.environ[MULTIPROCESS_DIR_VARIABLE] = created_dir
    # Worker processes configure logging from the environment, so pass on this one's level.
    os.environ.setdefault(
        "ONLINE_CTR_LOG_LEVEL", logging.getLevelName(logging.getLogger().getEffectiveLevel())
    )

    stop_metrics = start_metrics(exposition_registry(CollectorRegistry()), settings)
    logger.info(
        "Scorer listening on %s:%d with %d workers",
        settings.http_host,
        settings.http_port,
        settings.workers,
    )
    try:
        uvicorn.run(
            WORKER_APP, factory=True, workers=settings.workers, **_uvicorn_options(settings)
        )
    finally:
        if stop_metrics is not None:
            stop_metrics()
        if created_dir is not None:
            shutil.rmtree(created_dir, ignore_errors=True)
            del os.environ[MULTIPROCESS_DIR_VARIABLE]
    logger.info("Scorer stopped")
    return 0
