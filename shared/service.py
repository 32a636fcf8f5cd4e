"""Start-up and shutdown steps every service shares.

Connect, wait for dependencies with back-off, handle signals and serve metrics.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import CollectorRegistry, start_http_server

from shared.clock import Clock, SystemClock
from shared.errors import ConfigError, UnavailableError
from shared.settings import ServiceSettings

logger = logging.getLogger(__name__)


@dataclass
class ExponentialBackoff:
    """Delays that double from ``base_seconds`` up to ``max_seconds``; ``reset`` starts over."""

    base_seconds: float = 0.5
    max_seconds: float = 10.0
    attempt: int = 0

    def next_delay(self) -> float:
        """Return the delay before the next attempt and count the attempt."""
        delay = min(self.max_seconds, self.base_seconds * (2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the base delay after a success."""
        self.attempt = 0


def redis_options(settings: ServiceSettings) -> dict[str, Any]:
    """Return the keyword arguments for ``redis.Redis.from_url``, password and TLS included."""
    options: dict[str, Any] = {"socket_timeout": 10.0, "socket_connect_timeout": 5.0}
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    if settings.redis_tls_ca_file:
        if not settings.redis_url.startswith("rediss://"):
            raise ConfigError(
                "ONLINE_CTR_REDIS_TLS_CA_FILE is set but ONLINE_CTR_REDIS_URL does not start "
                "with rediss://; use a rediss:// URL for TLS or remove the CA file"
            )
        options["ssl_ca_certs"] = settings.redis_tls_ca_file
    return options


def make_redis(settings: ServiceSettings) -> redis.Redis:
    """Build a Redis client from the service settings."""
    return redis.Redis.from_url(settings.redis_url, **redis_options(settings))


def _redacted_url(url: str) -> str:
    # A URL may carry a password, as user:secret@host or ?password=secret;
    # never log either. The last "@" ends the credentials, which may contain "@".
    scheme, separator, rest = url.partition("://")
    if not separator:
        return "***"
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    base, _, query = rest.partition("?")
    if query:
        base += "?***"
    return f"{scheme}://{base}"


def wait_for_redis(
    client: redis.Redis, settings: ServiceSettings, clock: Clock | None = None
) -> None:
    """Block until Redis responds to PING, retrying with logged back-off."""
    clock = clock or SystemClock()
    deadline = clock.monotonic() + settings.startup_timeout_seconds
    backoff = ExponentialBackoff()
    while True:
        try:
            client.ping()
            return
        except redis.exceptions.AuthenticationError as error:
            raise UnavailableError(
                f"Redis at {_redacted_url(settings.redis_url)} rejected the credentials ({error}); "
                "check ONLINE_CTR_REDIS_PASSWORD"
            ) from None
        except redis.exceptions.RedisError as error:
            delay = backoff.next_delay()
            if clock.monotonic() + delay > deadline:
                raise UnavailableError(
                    f"Redis at {_redacted_url(settings.redis_url)} did not respond within "
                    f"{settings.startup_timeout_seconds:.0f} s ({error}); "
                    "check ONLINE_CTR_REDIS_URL and that Redis is up"
                ) from None
            logger.warning(
                "Redis at %s not reachable (attempt %d, %s); retrying in %.1f s",
                _redacted_url(settings.redis_url),
                backoff.attempt,
                error,
                delay,
            )
            clock.sleep(delay)


def install_stop_handlers() -> threading.Event:
    """Return an event that SIGTERM or SIGINT sets, so the main loop can finish its batch."""
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("Received %s; finishing the current batch", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def start_metrics(
    registry: CollectorRegistry, settings: ServiceSettings
) -> Callable[[], None] | None:
    """Serve /metrics on the configured port; return its stop function, or None if disabled."""
    if settings.metrics_port == 0:
        return None
    server, thread = start_http_server(
        settings.metrics_port, settings.metrics_host, registry=registry
    )
    logger.info("Serving metrics on %s:%d/metrics", settings.metrics_host, settings.metrics_port)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)

    return stop
