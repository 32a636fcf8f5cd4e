"""``online-ctr demo-local``: the whole demo as local processes, for machines without Docker.

It starts, on loopback ports chosen at start-up:

1. a Tansu Kafka-protocol broker and a redis-server (``shared.localstack``),
   and creates the pipeline's topics;
2. the joiner, trainer, scorer and traffic simulator, each an
   ``online-ctr <command>`` child process with its log file;
3. Prometheus with the deployment's scrape jobs and alert rules, and Grafana
   with the deployment's data source and dashboards when a Grafana binary is
   on PATH.

Then it prints where to look and waits. Ctrl-C (or ``--duration``) stops the
services in reverse order, each with SIGTERM so it commits and flushes, and
then the servers. Logs and data stay in the demo directory.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from shared.errors import UnavailableError
from shared.localstack import (
    LOOPBACK_HOST,
    LocalServer,
    PrometheusServer,
    RedisServer,
    TansuBroker,
    create_topics,
    find_free_port,
)

logger = logging.getLogger(__name__)

REPOSITORY = Path(__file__).resolve().parents[1]
DEPLOY_DIR = REPOSITORY / "deploy"
ALERT_RULES = DEPLOY_DIR / "prometheus" / "alerts.yml"
DASHBOARD_DIR = DEPLOY_DIR / "grafana" / "dashboards"
# The data source uid the dashboards refer to.
DATASOURCE_UID = "octr-prometheus"

# Prometheus job per service, as in deploy/prometheus/prometheus.yml, with the
# path each serves its metrics on. The scorer serves them on its HTTP port.
SCRAPE_JOBS = ("joiner", "trainer", "scorer", "simulator")
# Start order; they stop in reverse, so traffic stops first and the trainer learns last.
SERVICE_ORDER = ("trainer", "joiner", "scorer", "simulator")
DATA_PARTITIONS = 4
SERVICE_STOP_TIMEOUT_S = 20.0
# Each service waits up to ONLINE_CTR_STARTUP_TIMEOUT_SECONDS for Kafka and Redis first.
SERVICE_START_TIMEOUT_S = 90.0
CHECK_INTERVAL_S = 1.0

# Group timing that converges in seconds on Tansu (see TEST_CONSUMER_SETTINGS
# in shared.localstack), and the demo's short windows and cadences.
DEMO_SETTINGS: Mapping[str, str] = {
    "ONLINE_CTR_SESSION_TIMEOUT_MS": "6000",
    "ONLINE_CTR_HEARTBEAT_INTERVAL_MS": "1000",
    "ONLINE_CTR_MAX_POLL_INTERVAL_MS": "60000",
    "ONLINE_CTR_FETCH_MAX_WAIT_MS": "50",
    "ONLINE_CTR_STARTUP_TIMEOUT_SECONDS": "60",
    "ONLINE_CTR_WINDOW_SECONDS": "120",
    "ONLINE_CTR_ALLOWED_LATENESS_SECONDS": "5",
    "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "15",
    "ONLINE_CTR_SNAPSHOT_EVERY_SECONDS": "10",
    # The joiner's served notices let the trainer learn fake negatives.
    "ONLINE_CTR_EMIT_SERVED": "true",
    "ONLINE_CTR_DELAYED_FEEDBACK": "fake_negative",
    "ONLINE_CTR_SEGMENT_BY": "user_segment,category",
    "ONLINE_CTR_ROLLING_WINDOW": "3000",
    "ONLINE_CTR_RELOAD_POLL_INTERVAL_SECONDS": "2",
    "ONLINE_CTR_DRIFT_WINDOW_SIZE": "2000",
    "ONLINE_CTR_DRIFT_REFRESH_SECONDS": "5",
    "ONLINE_CTR_CLICK_DELAY_MAX_SECONDS": "90",
}


def prometheus_config(
    targets_by_job: Mapping[str, Sequence[str]],
    rule_files: Sequence[Path],
    scrape_interval_s: float,
) -> dict[str, Any]:
    """Return a Prometheus configuration with one scrape job per service."""
    interval = f"{scrape_interval_s:g}s"
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(targets)}]}
            for job, targets in targets_by_job.items()
        ],
    }


class DeployedPrometheusServer(PrometheusServer):
    """A local Prometheus with the deployment's jobs (one per service) and alert rules."""

    def __init__(
        self,
        targets_by_job: Mapping[str, Sequence[str]],
        *,
        rule_files: Sequence[str | Path] = (ALERT_RULES,),
        **options: Any,
    ) -> None:
        unknown = set(targets_by_job) - set(SCRAPE_JOBS)
        if unknown:
            raise ValueError(f"unknown scrape jobs {sorted(unknown)}; expected {SCRAPE_JOBS}")
        super().__init__((), rule_files=rule_files, **options)
        self.targets_by_job = {job: list(targets) for job, targets in targets_by_job.items()}

    def _before_start(self) -> None:
        config = prometheus_config(self.targets_by_job, self.rule_files, self.scrape_interval_s)
        # JSON is valid YAML, so no YAML library is needed.
        self.config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def find_grafana_bin() -> str | None:
    """Return the path of a Grafana server binary on PATH, or None when there is none."""
    return shutil.which("grafana") or shutil.which("grafana-server")


class GrafanaServer(LocalServer):
    """A local Grafana with the deployment's dashboards and a data source for ``prometheus_url``.

    Anonymous users may view, because the server listens on loopback only.
    """

    name = "grafana"

    def __init__(self, binary: str, prometheus_url: str, **options: Any) -> None:
        super().__init__(binary, start_timeout_s=60.0, **options)
        self.prometheus_url = prometheus_url
        self.admin_password = secrets.token_urlsafe(12)

    @property
    def url(self) -> str:
        """The base URL of the web UI."""
        return f"http://{LOOPBACK_HOST}:{self.port}"

    def _before_start(self) -> None:
        provisioning = self.workdir / "provisioning"
        (provisioning / "datasources").mkdir(parents=True, exist_ok=True)
        (provisioning / "dashboards").mkdir(parents=True, exist_ok=True)
        datasource = {
            "apiVersion": 1,
            "datasources": [
                {
                    "name": "Prometheus",
                    "uid": DATASOURCE_UID,
                    "type": "prometheus",
                    "access": "proxy",
                    "url": self.prometheus_url,
                    "isDefault": True,
                    "editable": False,
                }
            ],
        }
        dashboards = {
            "apiVersion": 1,
            "providers": [
                {
                    "name": "online-ctr",
                    "folder": "online-ctr",
                    "type": "file",
                    "disableDeletion": True,
                    "options": {"path": str(DASHBOARD_DIR)},
                }
            ],
        }
        (provisioning / "datasources" / "prometheus.yml").write_text(json.dumps(datasource))
        (provisioning / "dashboards" / "online-ctr.yml").write_text(json.dumps(dashboards))

    def _command(self) -> list[str]:
        command = [self.binary]
        if Path(self.binary).name == "grafana":
            command.append("server")
        # Debian and RPM packages keep Grafana's static files here; a tarball
        # install has them next to the binary, which Grafana finds by itself.
        if Path("/usr/share/grafana").is_dir():
            command.append("--homepath=/usr/share/grafana")
        return command

    def _environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment.update(
            {
                "GF_PATHS_DATA": str(self.workdir / "data"),
                "GF_PATHS_LOGS": str(self.workdir / "logs"),
                "GF_PATHS_PLUGINS": str(self.workdir / "plugins"),
                "GF_PATHS_PROVISIONING": str(self.workdir / "provisioning"),
                "GF_SERVER_HTTP_ADDR": LOOPBACK_HOST,
                "GF_SERVER_HTTP_PORT": str(self.port),
                "GF_SECURITY_ADMIN_PASSWORD": self.admin_password,
                "GF_AUTH_ANONYMOUS_ENABLED": "true",
                "GF_AUTH_ANONYMOUS_ORG_ROLE": "Viewer",
                "GF_ANALYTICS_REPORTING_ENABLED": "false",
                "GF_ANALYTICS_CHECK_FOR_UPDATES": "false",
                "GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH": str(DASHBOARD_DIR / "pipeline.json"),
            }
        )
        return environment

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/health", timeout=1.0) as response:
                return response.status == 200
        except OSError:
            return False


class ServiceProcess:
    """One ``online-ctr <command>`` child process, logging to its own file."""

    def __init__(self, name: str, command: Sequence[str], env: Mapping[str, str], log: Path):
        self.name = name
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process in its own session, so a Ctrl-C reaches only the demo."""
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", *self.command],
                env=self.env,
                cwd=REPOSITORY,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        logger.info("started %s (pid %d), log %s", self.name, self.process.pid, self.log_path)

    def exit_code(self) -> int | None:
        """Return the exit code, or None while the process runs or before it started."""
        return None if self.process is None else self.process.poll()

    def stop(self, timeout_s: float = SERVICE_STOP_TIMEOUT_S) -> int | None:
        """Send SIGTERM, wait up to ``timeout_s``, then SIGKILL; return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
                self.process.kill()
                self.process.wait()
        logger.info("stopped %s, exit code %s", self.name, self.process.returncode)
        return self.process.returncode


@dataclass(frozen=True)
class DemoOptions:
    """Traffic, drift time, duration and directory of one demo run."""

    impressions_per_second: float = 30.0
    drift_after_seconds: float | None = 300.0
    duration_seconds: float | None = None
    directory: Path | None = None
    scrape_interval_s: float = 2.0


class LocalDemo:
    """The servers and service processes of one demo run."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.directory = options.directory or Path(tempfile.mkdtemp(prefix="online-ctr-demo-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ports = {name: find_free_port() for name in SERVICE_ORDER}
        self.servers: list[LocalServer] = []
        self.services: list[ServiceProcess] = []
        self.prometheus: DeployedPrometheusServer | None = None
        self.grafana: GrafanaServer | None = None

    def start(self) -> None:
        """Start every server and service; on a failure, stop what already runs and re-raise."""
        try:
            redis_server = self._start_server(RedisServer(workdir=self.directory / "redis"))
            broker = self._start_server(TansuBroker(workdir=self.directory / "tansu"))
            create_topics(
                broker.bootstrap,
                {
                    "impressions": DATA_PARTITIONS,
                    "clicks": DATA_PARTITIONS,
                    "examples": DATA_PARTITIONS,
                    "dead-letter": 1,
                },
            )
            environment = self.service_environment(broker.bootstrap, redis_server.url)
            for name in SERVICE_ORDER:
                self._start_service(name, environment)
            self._start_monitoring()
            self._wait_for_services()
        except BaseException:
            self.stop()
            raise

    def service_environment(self, bootstrap: str, redis_url: str) -> dict[str, str]:
        """Return the environment shared by the services, without their own ports."""
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith("ONLINE_CTR_")
        }
        environment.update(DEMO_SETTINGS)
        environment.update(
            {
                "ONLINE_CTR_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "ONLINE_CTR_REDIS_URL": redis_url,
                "ONLINE_CTR_METRICS_HOST": LOOPBACK_HOST,
                # A fresh key per run: the demo's snapshots live only in its own Redis.
                "ONLINE_CTR_SIGNING_KEYS": "demo:" + secrets.token_hex(32),
                "ONLINE_CTR_SIGNING_KEY_ID": "demo",
                "ONLINE_CTR_SCORER_URL": f"http://{LOOPBACK_HOST}:{self.ports['scorer']}",
                "ONLINE_CTR_IMPRESSIONS_PER_SECOND": f"{self.options.impressions_per_second:g}",
                "ONLINE_CTR_LOG_LEVEL": "INFO",
            }
        )
        if self.options.drift_after_seconds is not None:
            environment["ONLINE_CTR_POPULATION_DRIFT_AFTER_SECONDS"] = (
                f"{self.options.drift_after_seconds:g}"
            )
        return environment

    def _start_server(self, server: LocalServer) -> Any:
        server.start()
        self.servers.append(server)
        return server

    def _start_service(self, name: str, environment: Mapping[str, str]) -> None:
        env = dict(environment)
        if name == "scorer":
            env["ONLINE_CTR_HTTP_HOST"] = LOOPBACK_HOST
            env["ONLINE_CTR_HTTP_PORT"] = str(self.ports[name])
        else:
            env["ONLINE_CTR_METRICS_PORT"] = str(self.ports[name])
        service = ServiceProcess(name, [name], env, self.directory / f"{name}.log")
        service.start()
        self.services.append(service)

    def _start_monitoring(self) -> None:
        targets = {job: [f"{LOOPBACK_HOST}:{self.ports[job]}"] for job in SCRAPE_JOBS}
        self.prometheus = self._start_server(
            DeployedPrometheusServer(
                targets,
                scrape_interval_s=self.options.scrape_interval_s,
                workdir=self.directory / "prometheus",
            )
        )
        grafana_bin = find_grafana_bin()
        if grafana_bin is None:
            logger.info("Grafana is not installed; the dashboards are not served")
            return
        try:
            self.grafana = self._start_server(
                GrafanaServer(grafana_bin, self.prometheus.url, workdir=self.directory / "grafana")
            )
        except UnavailableError as error:
            # The demo works without Grafana: Prometheus shows every query.
            logger.warning("Grafana failed to start, going on without it: %s", error)

    def health_url(self, name: str) -> str:
        """Return the URL that returns 200 once the service is up."""
        path = "/healthz" if name == "scorer" else "/metrics"
        return f"http://{LOOPBACK_HOST}:{self.ports[name]}{path}"

    def _wait_for_services(self) -> None:
        """Wait until every service serves its health URL; raise if one exits or times out."""
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        for service in self.services:
            url = self.health_url(service.name)
            while not _responds(url):
                code = service.exit_code()
                if code is not None:
                    raise UnavailableError(
                        f"{service.name} exited with code {code} during start-up; last lines "
                        f"of {service.log_path}:\n{_tail(service.log_path)}"
                    )
                if time.monotonic() >= deadline:
                    raise UnavailableError(
                        f"{service.name} did not serve {url} within {SERVICE_START_TIMEOUT_S:.0f} "
                        f"s; last lines of {service.log_path}:\n{_tail(service.log_path)}"
                    )
                time.sleep(0.5)
            logger.info("%s is up", service.name)

    def wait(self, stop: threading.Event) -> int:
        """Wait until ``stop`` is set or the duration ends; return 1 if a service exited first."""
        deadline = None
        if self.options.duration_seconds is not None:
            deadline = time.monotonic() + self.options.duration_seconds
        while not stop.wait(CHECK_INTERVAL_S):
            for service in self.services:
                code = service.exit_code()
                if code is not None:
                    logger.error(
                        "%s exited with code %d; last lines of %s:\n%s",
                        service.name,
                        code,
                        service.log_path,
                        _tail(service.log_path),
                    )
                    return 1
            if deadline is not None and time.monotonic() >= deadline:
                logger.info("demo duration of %.0f s is over", self.options.duration_seconds)
                return 0
        return 0

    def stop(self) -> None:
        """Stop the services, newest first, then the servers; the directory stays."""
        for service in reversed(self.services):
            service.stop()
        for server in reversed(self.servers):
            server.stop()

    def describe(self) -> str:
        """Return what runs where and what to look at, for the terminal."""
        scorer = f"http://{LOOPBACK_HOST}:{self.ports['scorer']}"
        lines = ["", "online-ctr demo is running on this machine:"]
        if self.grafana is not None:
            lines.append(
                f"  Grafana      {self.grafana.url}  (anonymous viewer; admin password "
                f"{self.grafana.admin_password})"
            )
        else:
            lines.append(
                "  Grafana      not installed; the dashboards' queries run in Prometheus too"
            )
        assert self.prometheus is not None
        lines += [
            f"  Prometheus   {self.prometheus.url}  (alerts: {self.prometheus.url}/alerts)",
            f"  Scorer API   {scorer}/docs  (readiness: {scorer}/readyz)",
            f"  Logs         {self.directory}",
            "",
            "What to look at:",
            "  - For the first seconds the scorer has no model and returns 503; the simulator",
            "    then logs its impressions unscored, and the trainer learns from their labels.",
            "  - The first model appears within about a minute: /readyz returns 200 and",
            "    octr_trainer_model_version rises.",
            "  - octr_trainer_normalized_entropy{arm='model'} falls below the baseline's.",
        ]
        if self.options.drift_after_seconds is not None:
            lines.append(
                f"  - After {self.options.drift_after_seconds:g} s the population drifts: "
                "octr_scorer_feature_psi and the unseen-category share rise, and the model's "
                "normalised entropy worsens before it recovers."
            )
        lines += ["", "Press Ctrl-C to stop everything."]
        return "\n".join(lines)


def _responds(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log file)"


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> int:
    """Run the local demo until Ctrl-C, SIGTERM or the duration ends; return an exit code."""
    out = out or sys.stdout
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        logger.info("received %s; stopping the demo", signal.Signals(signum).name)
        stop.set()

    previous = {
        signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)
    }
    demo = LocalDemo(options)
    try:
        demo.start()
        print(demo.describe(), file=out, flush=True)
        return demo.wait(stop)
    finally:
        demo.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        print(f"\nStopped. Logs and data are in {demo.directory}", file=out, flush=True)
