"""Secrets never appear in settings output, error messages or logs, even when start-up fails.

The secrets are the Redis password, the Kafka SASL password and the snapshot
signing keys. Each test sets them to distinctive values, makes start-up fail
in a way that could echo them, and searches every message and log line.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from services.trainer.settings import TrainerSettings
from shared.clock import ManualClock
from shared.errors import ConfigError, UnavailableError
from shared.kafka import client_config
from shared.localstack import LOOPBACK_HOST, find_free_port
from shared.logs import configure_logging
from shared.service import make_redis, wait_for_redis
from shared.settings import ServiceSettings, describe_settings, load_settings
from shared.snapshots import SigningKeys

REDIS_PASSWORD = "redis-pw-4f1c9e"
URL_PASSWORD = "url-pw-77aa01"
SASL_PASSWORD = "sasl-pw-b3d2e8"
SIGNING_SECRET = "5e" * 32
SIGNING_KEYS = f"k1:{SIGNING_SECRET}"
SERVER_PASSWORD = "server-pw-0c6d1f"
ALL_SECRETS = (REDIS_PASSWORD, URL_PASSWORD, SASL_PASSWORD, SIGNING_SECRET, SERVER_PASSWORD)


def assert_no_secret(text: str) -> None:
    for secret in ALL_SECRETS:
        assert secret not in text, f"a secret ({secret[:6]}...) appears in: {text}"


def closed_port() -> int:
    """Return a loopback port that nothing listens on (it was free when checked)."""
    return find_free_port()


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """Remove every ONLINE_CTR_* variable so that a test sets exactly what it needs."""
    for name in list(os.environ):
        if name.startswith("ONLINE_CTR_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_secret_fields_are_secret_str() -> None:
    fields = {**ServiceSettings.model_fields, **TrainerSettings.model_fields}

    for name in ("redis_password", "kafka_sasl_password", "signing_keys"):
        assert fields[name].annotation == SecretStr | None, name


def test_settings_output_hides_secrets() -> None:
    settings = TrainerSettings(
        redis_password=REDIS_PASSWORD,
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="trainer",
        kafka_sasl_password=SASL_PASSWORD,
        signing_keys=SIGNING_KEYS,
        signing_key_id="k1",
    )

    assert_no_secret(repr(settings))
    assert_no_secret(str(settings))
    assert_no_secret(settings.model_dump_json())
    assert_no_secret(describe_settings(TrainerSettings))


@pytest.mark.parametrize(
    "variables",
    [
        # SASL without a username: the model validator rejects the set.
        {
            "ONLINE_CTR_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "ONLINE_CTR_KAFKA_SASL_MECHANISM": "PLAIN",
        },
        # Signing keys without the active key id.
        {},
        # An invalid value next to the secrets.
        {"ONLINE_CTR_METRICS_PORT": "not-a-port"},
        # A misspelt secret variable: reported by name only.
        {"ONLINE_CTR_REDIS_PASWORD": REDIS_PASSWORD},
    ],
    ids=["sasl-incomplete", "signing-key-id-missing", "invalid-port", "misspelt-variable"],
)
def test_load_settings_errors_hide_secrets(
    clean_environment: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    clean_environment.setenv("ONLINE_CTR_REDIS_PASSWORD", REDIS_PASSWORD)
    clean_environment.setenv("ONLINE_CTR_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    clean_environment.setenv("ONLINE_CTR_SIGNING_KEYS", SIGNING_KEYS)
    for name, value in variables.items():
        clean_environment.setenv(name, value)

    with pytest.raises(ConfigError) as caught:
        load_settings(TrainerSettings)

    assert_no_secret(str(caught.value))


@pytest.mark.parametrize("field", ["redis_password", "kafka_sasl_password", "signing_keys"])
def test_invalid_secret_value_is_not_echoed(
    clean_environment: pytest.MonkeyPatch, field: str
) -> None:
    # A secret that is not a string, as a YAML or JSON loader could pass it.
    value = {"nested": SIGNING_SECRET}

    with pytest.raises(ConfigError) as caught:
        load_settings(TrainerSettings, **{field: value})

    assert field.upper() in str(caught.value)
    assert_no_secret(str(caught.value))


def test_wait_for_redis_at_closed_port_hides_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = ServiceSettings(
        redis_url=f"redis://:{URL_PASSWORD}@{LOOPBACK_HOST}:{closed_port()}/0",
        redis_password=REDIS_PASSWORD,
        startup_timeout_seconds=3,
    )
    client = make_redis(settings)

    with pytest.raises(UnavailableError) as caught:
        wait_for_redis(client, settings, ManualClock())

    assert "did not respond" in str(caught.value)
    assert_no_secret(str(caught.value))
    assert_no_secret(repr(client))
    assert caplog.records, "the retries were not logged"
    assert_no_secret(caplog.text)


def test_redacted_url_hides_password_with_at_sign(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    before_at, after_at = "pw-part-one", "pw-part-two"
    settings = ServiceSettings(
        redis_url=f"redis://user:{before_at}@{after_at}@{LOOPBACK_HOST}:{closed_port()}/0",
        startup_timeout_seconds=1,
    )

    with pytest.raises(UnavailableError) as caught:
        wait_for_redis(make_redis(settings), settings, ManualClock())

    output = str(caught.value) + caplog.text
    assert before_at not in output
    assert after_at not in output


def test_redacted_url_hides_password_query(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = ServiceSettings(
        redis_url=f"redis://{LOOPBACK_HOST}:{closed_port()}/0?password={URL_PASSWORD}",
        startup_timeout_seconds=1,
    )

    with pytest.raises(UnavailableError) as caught:
        wait_for_redis(make_redis(settings), settings, ManualClock())

    assert_no_secret(str(caught.value) + caplog.text)


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex((LOOPBACK_HOST, port)) == 0:
                return True
        time.sleep(0.02)
    return False


@pytest.fixture
def password_redis(redis_server_bin: str, tmp_path) -> Iterator[int]:
    """A redis-server of this test only, on loopback, that requires SERVER_PASSWORD."""
    port = find_free_port()
    process = subprocess.Popen(
        [
            redis_server_bin,
            "--bind",
            LOOPBACK_HOST,
            "--port",
            str(port),
            "--requirepass",
            SERVER_PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],  # fmt: skip
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_port(port, timeout=10), "redis-server did not start within 10 s"
        yield port
    finally:
        process.kill()
        process.wait(5)


@pytest.mark.integration
def test_wrong_redis_password_hides_secrets(
    password_redis: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = ServiceSettings(
        redis_url=f"redis://{LOOPBACK_HOST}:{password_redis}/0",
        redis_password=REDIS_PASSWORD,
        startup_timeout_seconds=3,
    )

    with pytest.raises(UnavailableError) as caught:
        wait_for_redis(make_redis(settings), settings, ManualClock())

    assert "rejected the credentials" in str(caught.value)
    assert_no_secret(str(caught.value))
    assert_no_secret(caplog.text)


@pytest.mark.integration
def test_right_redis_password_connects(password_redis: int) -> None:
    settings = ServiceSettings(
        redis_url=f"redis://{LOOPBACK_HOST}:{password_redis}/0",
        redis_password=SERVER_PASSWORD,
        startup_timeout_seconds=3,
    )
    client = make_redis(settings)

    wait_for_redis(client, settings, ManualClock())

    assert client.ping()
    client.close()


SHORT_SECRET = "short-9d"


@pytest.mark.parametrize(
    ("text", "active", "secret"),
    [
        (SIGNING_SECRET, "k1", SIGNING_SECRET),
        (f"k1:{SIGNING_SECRET},{SIGNING_SECRET}", "k1", SIGNING_SECRET),
        (f"k1:{SIGNING_SECRET},k1:{SIGNING_SECRET[::-1]}", "k1", SIGNING_SECRET[::-1]),
        (f"bad id:{SIGNING_SECRET}", "bad id", SIGNING_SECRET),
        (f"k1:{SIGNING_SECRET}", "k2", SIGNING_SECRET),
        (f"k1:{SHORT_SECRET}", "k1", SHORT_SECRET),
        (f":{SIGNING_SECRET}", "k1", SIGNING_SECRET),
    ],
    ids=[
        "bare-secret",
        "second-entry-bare",
        "repeated-key-id",
        "invalid-key-id",
        "unknown-active-id",
        "short-secret",
        "empty-key-id",
    ],
)
def test_signing_keys_errors_hide_secrets(text: str, active: str, secret: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SigningKeys.parse(SecretStr(text), active)

    assert secret not in str(caught.value)
    assert_no_secret(str(caught.value))


def test_signing_keys_reversed_entry_hides_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        SigningKeys.parse(SecretStr(f"{SIGNING_SECRET}:k1"), "k1")

    assert_no_secret(str(caught.value))


def test_signing_keys_repr_hides_secrets() -> None:
    keys = SigningKeys.parse(SecretStr(SIGNING_KEYS), "k1")

    assert_no_secret(repr(keys))
    assert_no_secret(str(keys))


def sasl_settings() -> ServiceSettings:
    return ServiceSettings(
        kafka_bootstrap_servers=f"{LOOPBACK_HOST}:{closed_port()}",
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="joiner",
        kafka_sasl_password=SASL_PASSWORD,
    )


def test_client_config_repr_hides_sasl_password() -> None:
    config = client_config(sasl_settings())

    assert_no_secret(repr(config))


def test_kafka_debug_logs_stay_off_at_debug_level() -> None:
    # kafka-python's admin client logs its whole configuration, SASL password
    # included, at DEBUG; the services' logging set-up keeps kafka at WARNING.
    root = logging.getLogger()
    kafka_logger = logging.getLogger("kafka")
    saved = (root.handlers[:], root.level, kafka_logger.level)
    try:
        configure_logging("DEBUG")
        assert not logging.getLogger("kafka.admin.client").isEnabledFor(logging.DEBUG)
    finally:
        root.handlers[:], root.level, kafka_logger.level = saved[0], saved[1], saved[2]


@pytest.mark.integration
def test_service_start_up_failure_hides_secrets(kafka_broker, tmp_path) -> None:
    # The joiner reaches Kafka, then gives up on a Redis port where nothing listens.
    env = {
        "PATH": "/usr/bin:/bin",
        "ONLINE_CTR_LOG_LEVEL": "DEBUG",
        "ONLINE_CTR_KAFKA_BOOTSTRAP_SERVERS": kafka_broker.bootstrap,
        "ONLINE_CTR_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "ONLINE_CTR_REDIS_URL": f"redis://:{URL_PASSWORD}@{LOOPBACK_HOST}:{closed_port()}/0",
        "ONLINE_CTR_REDIS_PASSWORD": REDIS_PASSWORD,
        "ONLINE_CTR_STARTUP_TIMEOUT_SECONDS": "2",
        "ONLINE_CTR_METRICS_PORT": "0",
    }

    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "joiner"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "ONLINE_CTR_REDIS_URL" in output
    assert_no_secret(output)


def test_trainer_bad_signing_keys_hides_secrets(tmp_path) -> None:
    # The trainer checks its keys before it connects to anything.
    env = {
        "PATH": "/usr/bin:/bin",
        "ONLINE_CTR_SIGNING_KEYS": f"k1:{SIGNING_SECRET},{SIGNING_SECRET}",
        "ONLINE_CTR_SIGNING_KEY_ID": "k1",
        "ONLINE_CTR_REDIS_PASSWORD": REDIS_PASSWORD,
        "ONLINE_CTR_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "ONLINE_CTR_METRICS_PORT": "0",
    }

    result = subprocess.run(
        [sys.executable, "-m", "shared.cli", "trainer"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "signing key entry 2" in output
    assert_no_secret(output)
