"""Typed settings shared by the services, read from ``ONLINE_CTR_*`` environment variables.

Each service has one settings class derived from :class:`ServiceSettings`.
``load_settings`` rejects unknown ``ONLINE_CTR_*`` variables, because a
misspelt variable would otherwise be ignored without a word, and turns every
validation error into a :class:`~shared.errors.ConfigError` that names the
variable to fix. Secrets are ``SecretStr`` and never appear in messages.
"""

from __future__ import annotations

import importlib
import os
from typing import Literal, TypeVar

import pydantic
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.errors import ConfigError

ENV_PREFIX = "ONLINE_CTR_"
# Variables read outside the settings classes.
_OTHER_VARIABLES = {"ONLINE_CTR_LOG_LEVEL", "ONLINE_CTR_LOG_FORMAT"}
# Every service's settings module. A deployment may share one environment
# file between services, so a variable that another service reads is allowed.
_SERVICE_SETTINGS_MODULES = (
    "services.joiner.settings",
    "services.trainer.settings",
    "services.scorer.settings",
    "services.simulator.settings",
)


class ServiceSettings(BaseSettings):
    """Connections to Kafka and Redis, topic names and logging, common to every service."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    kafka_bootstrap_servers: str = Field(
        default="127.0.0.1:9092", description="Comma-separated host:port list of Kafka brokers."
    )
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = Field(default=None, description="CA bundle for broker TLS.")

    topic_impressions: str = "impressions"
    topic_clicks: str = "clicks"
    topic_examples: str = "examples"
    topic_dead_letter: str = "dead-letter"

    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description=(
            "redis:// or rediss:// (TLS) URL; put the password in ONLINE_CTR_REDIS_PASSWORD."
        ),
    )
    redis_password: SecretStr | None = None
    redis_tls_ca_file: str | None = None

    metrics_port: int = Field(
        default=9100, ge=0, le=65535, description="Prometheus /metrics port; 0 disables it."
    )
    metrics_host: str = "0.0.0.0"
    startup_timeout_seconds: float = Field(
        default=120.0, gt=0, description="How long to wait for Kafka and Redis at start-up."
    )

    @model_validator(mode="after")
    def _check_sasl(self) -> ServiceSettings:
        uses_sasl = self.kafka_security_protocol.startswith("SASL")
        if uses_sasl and not (
            self.kafka_sasl_mechanism and self.kafka_sasl_username and self.kafka_sasl_password
        ):
            raise ValueError(
                "kafka_security_protocol is SASL_* but ONLINE_CTR_KAFKA_SASL_MECHANISM, "
                "ONLINE_CTR_KAFKA_SASL_USERNAME and ONLINE_CTR_KAFKA_SASL_PASSWORD are not all set"
            )
        return self


SettingsT = TypeVar("SettingsT", bound=ServiceSettings)


def _variable(field: str) -> str:
    return f"{ENV_PREFIX}{field.upper()}"


def _known_variables() -> set[str]:
    names = set(_OTHER_VARIABLES)
    for module_name in _SERVICE_SETTINGS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, ServiceSettings):
                names |= {_variable(name) for name in value.model_fields}
    return names


def load_settings(settings_class: type[SettingsT], **overrides: object) -> SettingsT:
    """Build a service's settings from the environment, with explicit overrides on top.

    Raises ConfigError for an unknown ``ONLINE_CTR_*`` variable or an invalid value,
    naming the variable.
    """
    known = _known_variables() | {_variable(name) for name in settings_class.model_fields}
    unknown = sorted(
        name for name in os.environ if name.startswith(ENV_PREFIX) and name not in known
    )
    if unknown:
        raise ConfigError(
            f"unknown setting {unknown[0]}: no service reads it; check its spelling against "
            "`online-ctr settings` or remove it"
        )

    try:
        return settings_class(**overrides)
    except pydantic.ValidationError as error:
        detail = error.errors(include_url=False)[0]
        field = ".".join(str(part) for part in detail.get("loc", ())) or "settings"
        message = detail.get("msg", "invalid")
        # The input is left out on purpose: it may be a secret.
        raise ConfigError(
            f"invalid setting {_variable(field) if field != 'settings' else field}: {message}"
        ) from None


def describe_settings(settings_class: type[ServiceSettings]) -> str:
    """Return one line per setting: variable, type, default and description."""
    lines = []
    for name, field in settings_class.model_fields.items():
        default = "(secret)" if "SecretStr" in str(field.annotation) else field.default
        description = f"  {field.description}" if field.description else ""
        lines.append(f"{_variable(name)}={default!s}{description}")
    return "\n".join(lines)
