"""The project's error hierarchy.

Every error names what failed, on which value, and what to do next, so that a
consumer can put the message on a dead-letter record or in a log line as is.
"""

from __future__ import annotations

from typing import Any

# Long values are cut in messages so one bad event cannot flood a log line.
_MAX_VALUE_CHARS = 120


def describe_value(value: Any) -> str:
    """Return a short, printable representation of a value for an error message."""
    text = repr(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


class OnlineCtrError(Exception):
    """Base class of every error this project raises on purpose."""

    retriable: bool = False


class InvalidEventError(OnlineCtrError):
    """An event, example or request failed validation.

    ``field`` is a dotted path such as ``features.price``, ``value`` the
    offending value, and ``rule`` the constraint it broke. Consumers send the
    event to the dead-letter topic with ``reason`` as the header.
    """

    def __init__(
        self, field: str, value: Any, rule: str, hint: str | None = None, code: str | None = None
    ) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        self.code = code or "invalid"
        self.hint = hint or "fix the producer of this event; the consumer skips it"
        super().__init__(
            f"invalid event: field {field!r} has value {describe_value(value)}, "
            f"which breaks the rule: {rule}; {self.hint}"
        )

    @property
    def reason(self) -> str:
        """A stable, low-cardinality label for metrics: the top-level field and the rule code."""
        return f"{self.field.split('.')[0]}:{self.code}"


class ConfigError(OnlineCtrError):
    """A setting is missing, malformed or inconsistent with another setting."""


class SnapshotError(OnlineCtrError):
    """A model snapshot failed verification or could not be loaded."""


class UnavailableError(OnlineCtrError):
    """A dependency (Kafka, Redis) could not be reached; retrying may help."""

    retriable = True
