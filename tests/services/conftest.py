"""Fixtures that run the services as real processes against the session's broker and Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.localstack import RedisServer, TansuBroker, create_topics, find_free_port

# Group timing that converges in a few seconds on the test broker.
FAST_GROUP_SETTINGS = {
    "ONLINE_CTR_SESSION_TIMEOUT_MS": "3000",
    "ONLINE_CTR_HEARTBEAT_INTERVAL_MS": "500",
    "ONLINE_CTR_MAX_POLL_INTERVAL_MS": "30000",
    "ONLINE_CTR_FETCH_MAX_WAIT_MS": "50",
    "ONLINE_CTR_STARTUP_TIMEOUT_SECONDS": "30",
}
DATA_PARTITIONS = 4
SIGNING_KEY = "k1:" + "ab" * 32


class ServiceProcess:
    """One ``online-ctr <command>`` process with its own log file."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command = command
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *self.command],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self

    def stop(self, timeout: float = 20.0) -> int | None:
        """Send SIGTERM and wait; the service commits and leaves its group."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def kill(self) -> None:
        """Send SIGKILL: no commit, no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(autouse=True)
def close_example_readers() -> Iterator[None]:
    """Close the examples-topic readers a test opened, after it ends."""
    from tests.services.joiner.test_joiner_live import ExampleReader

    yield
    ExampleReader.close_all()


def service_env(bootstrap: str, redis_url: str, unique_name: str) -> dict[str, str]:
    """Return the services' environment: this test's own topics, group ids and Redis namespaces."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ONLINE_CTR_")}
    env.update(FAST_GROUP_SETTINGS)
    env.update(
        {
            "ONLINE_CTR_TOPIC_IMPRESSIONS": f"{unique_name}-impressions",
            "ONLINE_CTR_TOPIC_CLICKS": f"{unique_name}-clicks",
            "ONLINE_CTR_TOPIC_EXAMPLES": f"{unique_name}-examples",
            "ONLINE_CTR_TOPIC_DEAD_LETTER": f"{unique_name}-dead-letter",
            "ONLINE_CTR_KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "ONLINE_CTR_REDIS_URL": redis_url,
            "ONLINE_CTR_JOINER_GROUP_ID": f"{unique_name}-joiner",
            "ONLINE_CTR_TRAINER_GROUP_ID": f"{unique_name}-trainer",
            "ONLINE_CTR_REDIS_NAMESPACE": f"{unique_name}:join",
            "ONLINE_CTR_LOG_LEVEL": "INFO",
        }
    )
    return env


def topic_partitions(env: dict[str, str]) -> dict[str, int]:
    """Return the partition count of each topic the environment names."""
    return {
        env["ONLINE_CTR_TOPIC_IMPRESSIONS"]: DATA_PARTITIONS,
        env["ONLINE_CTR_TOPIC_CLICKS"]: DATA_PARTITIONS,
        env["ONLINE_CTR_TOPIC_EXAMPLES"]: DATA_PARTITIONS,
        env["ONLINE_CTR_TOPIC_DEAD_LETTER"]: 1,
    }


def trainer_env(unique_name: str) -> dict[str, str]:
    """Return the trainer's signing keys, namespaces and a snapshot every second."""
    return {
        "ONLINE_CTR_SIGNING_KEYS": SIGNING_KEY,
        "ONLINE_CTR_SIGNING_KEY_ID": "k1",
        "ONLINE_CTR_REGISTRY_NAMESPACE": f"{unique_name}:models",
        "ONLINE_CTR_DEDUP_NAMESPACE": f"{unique_name}:trainer",
        "ONLINE_CTR_SNAPSHOT_EVERY_SECONDS": "1",
        "ONLINE_CTR_SNAPSHOT_EVERY_EXAMPLES": "5000",
    }


@pytest.fixture
def pipeline_env(
    kafka_broker: TansuBroker, redis_server: RedisServer, unique_name: str
) -> dict[str, str]:
    """Build the services' environment on the session's broker and Redis, and create its topics."""
    env = service_env(kafka_broker.bootstrap, redis_server.url, unique_name)
    create_topics(kafka_broker.bootstrap, topic_partitions(env))
    return env


@pytest.fixture
def live_env(pipeline_env: dict[str, str], unique_name: str) -> dict[str, str]:
    """Extend the pipeline's environment for the joiner and the trainer together."""
    return {**pipeline_env, "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "2", **trainer_env(unique_name)}


@pytest.fixture
def start_service(tmp_path: Path) -> Iterator:
    """Start ``online-ctr`` commands as processes; all are killed when the test ends."""
    started: list[ServiceProcess] = []

    def start(command: list[str], env: dict[str, str], name: str | None = None) -> ServiceProcess:
        env = dict(env)
        env.setdefault("ONLINE_CTR_METRICS_PORT", str(find_free_port()))
        log_path = tmp_path / f"{name or command[0]}-{len(started)}.log"
        service = ServiceProcess(command, env, log_path).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.kill()


def wait_until(
    condition, timeout: float, interval: float = 0.2, message: str = "", services=()
) -> None:
    """Poll ``condition`` until it returns true, or fail after ``timeout`` seconds.

    The failure message ends with the last log lines of each service given.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    logs = "".join(
        f"\n--- {service.log_path.name} ---\n" + "\n".join(service.log().splitlines()[-30:])
        for service in services
    )
    pytest.fail(f"timed out after {timeout:.0f} s: {message}{logs}")
