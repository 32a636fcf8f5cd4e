"""Fixtures of the deployment tests: the service-process fixtures of tests/services."""

from tests.services.conftest import pipeline_env, start_service

__all__ = ["pipeline_env", "start_service"]
