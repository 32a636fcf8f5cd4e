"""``online-ctr demo-local``: starts everything, prints where to look, stops on Ctrl-C."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared.demo_local import SCRAPE_JOBS, prometheus_config

ROOT = Path(__file__).parents[2]
READY_LINE = "Press Ctrl-C to stop everything."
START_TIMEOUT_S = 90
STOP_TIMEOUT_S = 90


def test_prometheus_config_has_one_job_per_service(tmp_path) -> None:
    targets = {job: [f"127.0.0.1:{9000 + index}"] for index, job in enumerate(SCRAPE_JOBS)}

    config = prometheus_config(targets, [tmp_path / "alerts.yml"], scrape_interval_s=2.0)

    assert config["global"]["scrape_interval"] == "2s"
    assert config["rule_files"] == [str(tmp_path / "alerts.yml")]
    assert [job["job_name"] for job in config["scrape_configs"]] == list(SCRAPE_JOBS)
    assert config["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:9000"]}]


def active_jobs(prometheus_url: str) -> set[str]:
    with urllib.request.urlopen(f"{prometheus_url}/api/v1/targets", timeout=5) as response:
        targets = json.load(response)["data"]["activeTargets"]
    return {target["labels"]["job"] for target in targets}


@pytest.mark.integration
@pytest.mark.slow
def test_demo_local_runs_and_stops_on_ctrl_c(
    tmp_path, redis_server_bin, tansu_bin, prometheus_bin
) -> None:
    demo_dir = tmp_path / "demo"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.cli",
            "demo-local",
            "--rate",
            "20",
            "--no-drift",
            "--dir",
            str(demo_dir),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if READY_LINE in line:
                break
        text = "".join(output)
        assert READY_LINE in text, text

        prometheus_url = re.search(r"Prometheus\s+(http://127\.0\.0\.1:\d+)", text).group(1)
        scorer_url = re.search(r"Scorer API\s+(http://127\.0\.0\.1:\d+)/docs", text).group(1)
        # Prometheus lists its targets a moment after it reports ready.
        jobs: set[str] = set()
        deadline = time.monotonic() + 15
        while jobs != set(SCRAPE_JOBS) and time.monotonic() < deadline:
            time.sleep(0.5)
            jobs = active_jobs(prometheus_url)
        assert jobs == set(SCRAPE_JOBS)
        with urllib.request.urlopen(f"{scorer_url}/healthz", timeout=5) as response:
            assert response.status == 200

        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        # SIGKILL on the demo would orphan the servers and services it started
        # in their own sessions; Ctrl-C first lets it stop them.
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    text += rest
    assert process.returncode == 0, text
    assert f"Stopped. Logs and data are in {demo_dir}" in text
    for name in ("joiner", "trainer", "scorer", "simulator"):
        assert (demo_dir / f"{name}.log").stat().st_size > 0, name
        assert f"stopped {name}" in text, name
