"""TLS and authentication settings reach the Redis and Kafka clients the services build.

No TLS server is started: the tests inspect the clients' configuration.
Kafka clients are built with an explicit ``api_version`` so that they do not
contact a broker at construction.
"""

from __future__ import annotations

import ssl

import pydantic
import pytest
import redis

from shared import kafka as kafka_module
from shared.errors import ConfigError
from shared.kafka import client_config, make_admin, make_consumer, make_producer
from shared.localstack import LOOPBACK_HOST, find_free_port
from shared.service import make_redis
from shared.settings import ServiceSettings

# Never read: no test opens a connection.
CA_FILE = "/run/secrets/octr-ca.pem"
REDIS_PASSWORD = "redis-pw-transport"
SASL_PASSWORD = "sasl-pw-transport"
# Any released protocol version; with it set, kafka-python skips the probe.
API_VERSION = (2, 5)


def tls_redis_settings(**overrides: object) -> ServiceSettings:
    options: dict[str, object] = {
        "redis_url": "rediss://cache.internal:6380/2",
        "redis_password": REDIS_PASSWORD,
        "redis_tls_ca_file": CA_FILE,
    }
    options.update(overrides)
    return ServiceSettings(**options)


def sasl_ssl_settings(**overrides: object) -> ServiceSettings:
    options: dict[str, object] = {
        "kafka_bootstrap_servers": f"{LOOPBACK_HOST}:{find_free_port()},broker-2.internal:9093",
        "kafka_security_protocol": "SASL_SSL",
        "kafka_sasl_mechanism": "SCRAM-SHA-512",
        "kafka_sasl_username": "joiner",
        "kafka_sasl_password": SASL_PASSWORD,
        "kafka_ssl_cafile": CA_FILE,
    }
    options.update(overrides)
    return ServiceSettings(**options)


# Redis.


def test_rediss_url_builds_tls_pool() -> None:
    client = make_redis(tls_redis_settings())
    pool = client.connection_pool

    assert pool.connection_class is redis.SSLConnection
    kwargs = pool.connection_kwargs
    assert kwargs["host"] == "cache.internal"
    assert kwargs["port"] == 6380
    assert kwargs["db"] == 2
    assert kwargs["password"] == REDIS_PASSWORD
    assert kwargs["ssl_ca_certs"] == CA_FILE


def test_tls_connection_verifies_certificate_and_host() -> None:
    connection = make_redis(tls_redis_settings()).connection_pool.make_connection()

    assert connection.ca_certs == CA_FILE
    assert connection.cert_reqs == ssl.CERT_REQUIRED
    assert connection.check_hostname is True
    connection.disconnect()


def test_plain_redis_url_sends_password_without_tls() -> None:
    settings = ServiceSettings(redis_url="redis://127.0.0.1:6390/0", redis_password=REDIS_PASSWORD)

    pool = make_redis(settings).connection_pool

    assert pool.connection_class is redis.Connection
    assert pool.connection_kwargs["password"] == REDIS_PASSWORD
    assert "ssl_ca_certs" not in pool.connection_kwargs


def test_redis_without_password_sends_none() -> None:
    pool = make_redis(ServiceSettings(redis_url="redis://127.0.0.1:6390/0")).connection_pool

    assert pool.connection_kwargs.get("password") is None


def test_redis_timeouts_are_bounded() -> None:
    kwargs = make_redis(tls_redis_settings()).connection_pool.connection_kwargs

    assert 0 < kwargs["socket_connect_timeout"] <= kwargs["socket_timeout"]


def test_ca_file_needs_tls_url() -> None:
    with pytest.raises((ConfigError, pydantic.ValidationError)):
        settings = tls_redis_settings(redis_url="redis://cache.internal:6380/2")
        make_redis(settings).connection_pool.make_connection()


# Kafka.


def test_client_config_carries_sasl_ssl() -> None:
    config = client_config(sasl_ssl_settings())

    assert config["bootstrap_servers"][1] == "broker-2.internal:9093"
    assert config["security_protocol"] == "SASL_SSL"
    assert config["sasl_mechanism"] == "SCRAM-SHA-512"
    assert config["sasl_plain_username"] == "joiner"
    assert config["sasl_plain_password"] == SASL_PASSWORD
    assert config["ssl_cafile"] == CA_FILE


def test_client_config_ssl_without_sasl() -> None:
    config = client_config(
        sasl_ssl_settings(
            kafka_security_protocol="SSL",
            kafka_sasl_mechanism=None,
            kafka_sasl_username=None,
            kafka_sasl_password=None,
        )
    )

    assert config["security_protocol"] == "SSL"
    assert config["ssl_cafile"] == CA_FILE
    assert not any(name.startswith("sasl_") for name in config)


def test_client_config_sasl_plaintext_has_no_ca() -> None:
    config = client_config(sasl_ssl_settings(kafka_security_protocol="SASL_PLAINTEXT"))

    assert config["security_protocol"] == "SASL_PLAINTEXT"
    assert config["sasl_plain_password"] == SASL_PASSWORD
    assert "ssl_cafile" not in config


def test_sasl_without_credentials_is_rejected() -> None:
    with pytest.raises(pydantic.ValidationError, match="ONLINE_CTR_KAFKA_SASL_PASSWORD"):
        sasl_ssl_settings(kafka_sasl_password=None)


@pytest.mark.parametrize("factory", ["producer", "consumer"])
def test_kafka_client_receives_security_settings(factory: str) -> None:
    settings = sasl_ssl_settings()
    if factory == "producer":
        client = make_producer(settings, api_version=API_VERSION)
    else:
        client = make_consumer(settings, "transport-test", api_version=API_VERSION)

    try:
        config = client.config
        assert config["security_protocol"] == "SASL_SSL"
        assert config["sasl_mechanism"] == "SCRAM-SHA-512"
        assert config["sasl_plain_username"] == "joiner"
        assert config["sasl_plain_password"] == SASL_PASSWORD
        assert config["ssl_cafile"] == CA_FILE
        # kafka-python's default; the project relies on it for broker TLS.
        assert config["ssl_check_hostname"] is True
    finally:
        client.close()


def test_admin_factory_passes_security_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # KafkaAdminClient contacts the broker in its constructor, so it is replaced.
    received: dict[str, object] = {}
    monkeypatch.setattr(kafka_module, "KafkaAdminClient", lambda **kwargs: received.update(kwargs))
    settings = sasl_ssl_settings()

    make_admin(settings)

    assert {name: received[name] for name in client_config(settings)} == client_config(settings)
    assert received["request_timeout_ms"] > 0
