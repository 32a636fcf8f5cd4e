"""The joiner's consumer-lag and window-size metrics move as the stream is consumed."""

from __future__ import annotations

import time

import pytest

from tests.services.conftest import wait_until
from tests.services.joiner.test_joiner_live import SAMPLE, produce
from tests.services.scenarios.test_join_failures import metric

pytestmark = pytest.mark.integration


def test_lag_and_pending_rise_then_fall(pipeline_env, start_service) -> None:
    produce(SAMPLE, pipeline_env)
    env = {
        **pipeline_env,
        "ONLINE_CTR_IDLE_TIMEOUT_SECONDS": "3",
        # Small polls keep the backlog visible for a few seconds.
        "ONLINE_CTR_MAX_POLL_RECORDS": "200",
    }
    joiner = start_service(["joiner"], env, name="joiner")
    port = joiner.env["ONLINE_CTR_METRICS_PORT"]

    lag_seen, pending_seen = [], []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        lag = metric(port, "octr_joiner_consumer_lag_records")
        pending = metric(port, "octr_joiner_pending_impressions")
        if lag is not None and pending is not None:
            lag_seen.append(lag)
            pending_seen.append(pending)
            if max(lag_seen) > 0 and lag == 0 and max(pending_seen) > 0 and pending == 0:
                break
        time.sleep(0.2)

    assert joiner.is_running(), joiner.log()
    assert max(lag_seen) > 1000, lag_seen[:20]
    assert lag_seen[-1] == 0
    assert max(pending_seen) > 0
    # Every window closes once the stream is idle: nothing stays pending.
    assert pending_seen[-1] == 0
    wait_until(
        lambda: metric(port, "octr_joiner_examples_emitted_total") == 60_000,
        timeout=30,
        message="not every impression got its example",
        services=(joiner,),
    )
