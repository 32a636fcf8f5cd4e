"""docker-compose.yml, checked statically: no Docker engine is needed.

The checks are the conventions the file promises: pinned images, a health
check and a restart policy on every long-running service, conditions on
every dependency, fail-fast secrets, and service settings and commands that
the code actually has.
"""

from __future__ import annotations

import http.server
import importlib
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from shared.cli import SERVICES, build_parser
from shared.localstack import find_free_port
from shared.settings import ENV_PREFIX, ServiceSettings

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# Services that run once and exit, with the reason they need no health check.
ONE_SHOT = {
    "topics": "creates the topics and exits 0; dependants wait for its successful completion",
}
# Variables every service may read besides its settings class (see shared/settings.py).
OTHER_VARIABLES = {"ONLINE_CTR_LOG_LEVEL", "ONLINE_CTR_LOG_FORMAT"}
# Secrets that must come from .env with ${VAR:?message}.
SECRETS = {"REDIS_PASSWORD", "SIGNING_KEYS", "SIGNING_KEY_ID", "GRAFANA_ADMIN_PASSWORD"}
RESTART_POLICIES = {"no", "always", "on-failure", "unless-stopped"}
DEPENDENCY_CONDITIONS = {"service_healthy", "service_completed_successfully"}


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def app_services(services) -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile."""
    return {name: spec for name, spec in services.items() if "build" in spec}


def settings_class(command: list[str]) -> type[ServiceSettings]:
    """Return the settings class that the service started by ``command`` reads."""
    if command[0] in SERVICES:
        module_name, class_name = SERVICES[command[0]][2].rsplit(":", 1)
        return getattr(importlib.import_module(module_name), class_name)
    # The other commands (topics, produce) read the common settings.
    return ServiceSettings


def test_compose_lists_expected_services(services) -> None:
    expected = {
        "kafka",
        "redis",
        "topics",
        "joiner",
        "trainer",
        "scorer",
        "simulator",
        "prometheus",
        "grafana",
    }

    assert set(services) == expected


def test_images_pinned_to_versions(services) -> None:
    for name, spec in services.items():
        image = spec.get("image")
        assert image, f"service {name} has no image name"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag, f"service {name}: image {image!r} has no tag"
        assert tag != "latest", f"service {name}: image {image!r} uses the latest tag"
        assert re.search(r"\d+\.\d+", tag), f"service {name}: tag {tag!r} is not a version"


def test_kafka_is_official_image_in_kraft_mode(services) -> None:
    kafka = services["kafka"]
    environment = kafka["environment"]

    assert kafka["image"].startswith("apache/kafka:")
    assert environment["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "CONTROLLER" in environment["KAFKA_LISTENERS"]
    assert environment["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(
        f"{environment['KAFKA_NODE_ID']}@kafka:"
    )
    assert not any("ZOOKEEPER" in key for key in environment)


def test_kafka_cluster_id_is_base64_uuid(services) -> None:
    import base64

    cluster_id = services["kafka"]["environment"]["CLUSTER_ID"]

    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def test_redis_has_aof_and_password(services) -> None:
    redis_service = services["redis"]
    command = " ".join(redis_service["command"])

    assert "--appendonly yes" in command
    assert '--requirepass "$$REDIS_PASSWORD"' in command
    assert redis_service["environment"]["REDIS_PASSWORD"].startswith("${REDIS_PASSWORD:?")


def test_long_running_services_have_healthcheck(services) -> None:
    for name, spec in services.items():
        if name in ONE_SHOT:
            continue
        healthcheck = spec.get("healthcheck")
        assert healthcheck, f"service {name} has no healthcheck"
        assert not healthcheck.get("disable"), f"service {name} disables its healthcheck"
        test = healthcheck.get("test")
        assert isinstance(test, list), f"service {name}: healthcheck test should be a list"
        assert test[0] in ("CMD", "CMD-SHELL"), f"service {name}: healthcheck {test!r}"


def test_one_shot_jobs_have_reason_and_no_restart(services) -> None:
    for name, reason in ONE_SHOT.items():
        assert reason
        assert services[name]["restart"] == "no", f"one-shot service {name} must not restart"
        assert "healthcheck" not in services[name]


def test_every_service_has_restart_policy(services) -> None:
    for name, spec in services.items():
        assert spec.get("restart") in RESTART_POLICIES, f"service {name}: restart policy"
        if name not in ONE_SHOT:
            assert spec["restart"] != "no", f"long-running service {name} never restarts"


def test_depends_on_uses_conditions(services) -> None:
    for name, spec in services.items():
        depends_on = spec.get("depends_on", {})
        assert isinstance(depends_on, dict), f"service {name}: depends_on must be a mapping"
        for dependency, options in depends_on.items():
            assert dependency in services, f"service {name} depends on unknown {dependency}"
            condition = (options or {}).get("condition")
            assert condition in DEPENDENCY_CONDITIONS, (
                f"service {name} -> {dependency}: condition {condition!r}"
            )
            if dependency in ONE_SHOT:
                assert condition == "service_completed_successfully"
            else:
                assert condition == "service_healthy"
                assert "healthcheck" in services[dependency]


def test_app_environment_matches_settings(services) -> None:
    for name, spec in app_services(services).items():
        allowed = settings_class(spec["command"]).model_fields
        for variable in spec.get("environment", {}):
            if not variable.startswith(ENV_PREFIX) or variable in OTHER_VARIABLES:
                continue
            field = variable[len(ENV_PREFIX) :].lower()
            assert field in allowed, f"service {name}: {variable} is not a setting of it"


def test_app_environment_values_validate(services) -> None:
    """Values without interpolation must pass the settings class's own checks."""
    for name, spec in app_services(services).items():
        values = {
            variable[len(ENV_PREFIX) :].lower(): str(value)
            for variable, value in spec.get("environment", {}).items()
            if variable.startswith(ENV_PREFIX)
            and variable not in OTHER_VARIABLES
            and "${" not in str(value)
        }
        try:
            settings_class(spec["command"]).model_validate(values)
        except pydantic.ValidationError as error:
            pytest.fail(f"service {name}: invalid settings in docker-compose.yml: {error}")


def test_app_commands_are_cli_subcommands(services) -> None:
    parser = build_parser()
    for name, spec in app_services(services).items():
        command = spec["command"]
        assert isinstance(command, list), f"service {name}: command should be a list"
        # argparse exits on an unknown subcommand or option.
        args = parser.parse_args(command)
        assert args.command == command[0]


def test_app_build_targets_exist_in_dockerfile(services) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", dockerfile, flags=re.MULTILINE))

    for name, spec in app_services(services).items():
        assert spec["build"]["target"] in stages, f"service {name}: unknown build target"


def test_dockerfile_health_check_per_service(services) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stage_texts = re.split(r"^FROM\s+", dockerfile, flags=re.MULTILINE)[1:]
    stages = {text.split()[2]: text for text in stage_texts if " AS " in text.splitlines()[0]}

    for name, spec in app_services(services).items():
        stage = stages[spec["build"]["target"]]
        assert "HEALTHCHECK" in stage, f"stage {name} has no HEALTHCHECK"
        assert "USER root" not in stage, f"stage {name} switches back to root"
    assert "USER octr" in stages["runtime"]
    assert "constraints.txt" in stages["build"]


def test_secrets_fail_fast(services) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Z_]+)", text))

    for secret in SECRETS:
        assert secret in used, f"{secret} is not used"
        assert re.search(rf"\$\{{{secret}:\?[^}}]+\}}", text), f"{secret} is not ${{VAR:?}}"
    # No secret has a default in the file itself.
    for secret in SECRETS:
        assert not re.search(rf"\$\{{{secret}:-", text), f"{secret} has a default"


def test_env_example_documents_every_variable(services) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = ENV_EXAMPLE.read_text(encoding="utf-8")
    documented = set(re.findall(r"^#?\s*([A-Z_]+)=", example, flags=re.MULTILINE))

    assert used <= documented, f"undocumented in .env.example: {sorted(used - documented)}"
    for secret in SECRETS - {"SIGNING_KEY_ID"}:
        assert re.search(rf"^{secret}=$", example, flags=re.MULTILINE), (
            f"{secret} must be empty in .env.example"
        )


def test_published_ports_bound_to_loopback(services) -> None:
    published = {}
    for name, spec in services.items():
        for port in spec.get("ports", []):
            published[name] = port
            assert str(port).startswith("127.0.0.1:"), f"service {name} publishes {port}"

    assert set(published) == {"grafana", "prometheus", "scorer"}


def test_prometheus_and_grafana_mount_deploy_files(services) -> None:
    prometheus_volumes = services["prometheus"]["volumes"]
    grafana_volumes = services["grafana"]["volumes"]

    assert any(v.startswith("./deploy/prometheus/alerts.yml:") for v in prometheus_volumes)
    assert any(v.startswith("./deploy/prometheus/prometheus.yml:") for v in prometheus_volumes)
    assert any(v.startswith("./deploy/grafana/provisioning:") for v in grafana_volumes)
    assert any(
        v.startswith("./deploy/grafana/dashboards:/etc/grafana/dashboards") for v in grafana_volumes
    )
    for volume in prometheus_volumes + grafana_volumes:
        source = volume.split(":", 1)[0]
        if source.startswith("./"):
            assert (ROOT / source).exists(), f"mounted path {source} does not exist"


def test_scrape_targets_match_service_ports(services) -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        job["job_name"]: target
        for job in config["scrape_configs"]
        for group in job["static_configs"]
        for target in group["targets"]
    }

    for name, spec in app_services(services).items():
        if name in ONE_SHOT:
            continue
        settings = settings_class(spec["command"])
        environment = spec.get("environment", {})
        port_field = "http_port" if name == "scorer" else "metrics_port"
        default_port = settings.model_fields[port_field].default
        port = int(environment.get(f"{ENV_PREFIX}{port_field.upper()}", default_port))
        assert targets[name] == f"{name}:{port}", f"job {name} scrapes {targets[name]}"


# Health check commands, run against a loopback HTTP server.


class _HealthHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server interface
        status = 200 if self.path in ("/metrics", "/healthz") else 404
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HealthHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def dockerfile_health_commands() -> dict[str, list[str]]:
    """Return ``{stage: exec-form command}`` of every HEALTHCHECK CMD in the Dockerfile."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    commands = {}
    stage = None
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line)
        if match:
            stage = match.group(1)
        if line.startswith("HEALTHCHECK") and " CMD " in line:
            commands[stage] = json.loads(line.split(" CMD ", 1)[1])
    return commands


def run_health_command(command: list[str], port: int) -> int:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)},
        "ONLINE_CTR_METRICS_PORT": str(port),
        "ONLINE_CTR_HTTP_PORT": str(port),
    }
    argv = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode


def test_dockerfile_health_checks_pass_and_fail(health_server) -> None:
    commands = dockerfile_health_commands()
    closed_port = find_free_port()

    assert set(commands) == {"joiner", "trainer", "scorer", "simulator"}
    for stage, command in commands.items():
        assert run_health_command(command, health_server) == 0, stage
        assert run_health_command(command, closed_port) != 0, stage


def test_compose_health_checks_pass_and_fail(services, health_server) -> None:
    closed_port = find_free_port()
    for name, spec in app_services(services).items():
        if name in ONE_SHOT:
            continue
        command = spec["healthcheck"]["test"][1:]
        assert command[0] == "python", name
        for port, expected_ok in ((health_server, True), (closed_port, False)):
            local = [re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", part) for part in command]
            code = run_health_command(local, port)
            assert (code == 0) == expected_ok, f"service {name}: exit code {code} on port {port}"
