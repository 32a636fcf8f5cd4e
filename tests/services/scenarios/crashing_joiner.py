"""A joiner that fails at a chosen point, for crash and stall tests.

Usage: python -m tests.services.scenarios.crashing_joiner POINT, with POINT one of:

- ``before-deliver``: SIGKILL once a click is joined and its example is in
  the Redis outbox, before anything is produced;
- ``before-commit``: SIGKILL once that example is produced and acknowledged,
  before the offsets are committed;
- ``stall-before-commit``: at that same point, sleep for
  STALL_SECONDS (default 12) once, then carry on.

Settings come from the same ONLINE_CTR_* variables as ``online-ctr joiner``.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from services.joiner import app
from services.joiner.main import run
from services.joiner.settings import JoinerSettings
from shared.logs import configure_logging
from shared.settings import load_settings

POINTS = ("before-deliver", "before-commit", "stall-before-commit")


def install(point: str) -> None:
    deliver, commit = app.Joiner._deliver, app.Joiner._commit
    state = {"positive_delivered": False}

    def crashing_deliver(self, examples):
        has_positive = any(example.label == 1 for _, example in examples)
        if point == "before-deliver" and has_positive:
            os.kill(os.getpid(), signal.SIGKILL)
        delivered = deliver(self, examples)
        state["positive_delivered"] |= delivered and has_positive
        return delivered

    def crashing_commit(self):
        if point == "before-commit" and state["positive_delivered"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if point == "stall-before-commit" and state["positive_delivered"]:
            state["positive_delivered"] = False
            seconds = float(os.environ.get("STALL_SECONDS", "12"))
            print(f"stalling for {seconds} s before the commit", flush=True)
            time.sleep(seconds)
        return commit(self)

    app.Joiner._deliver = crashing_deliver
    app.Joiner._commit = crashing_commit


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in POINTS:
        sys.exit(
            f"usage: python -m tests.services.scenarios.crashing_joiner {{{','.join(POINTS)}}}"
        )
    configure_logging()
    install(sys.argv[1])
    sys.exit(run(load_settings(JoinerSettings)))
