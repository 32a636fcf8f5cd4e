"""Write .env from .env.example with fresh random secrets, unless .env exists.

Every empty secret in .env.example gets a random value; other lines are
copied as they are. The file is created readable by its owner only. Run it
from the repository root (``make env`` does)::

    python3 deploy/write_env.py
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

EXAMPLE = Path(".env.example")
TARGET = Path(".env")

# Generator of each secret; the trainer needs signing secrets of at least 32 bytes.
GENERATORS = {
    "REDIS_PASSWORD": lambda: secrets.token_urlsafe(32),
    "SIGNING_KEYS": lambda: "k1:" + secrets.token_hex(32),
    "GRAFANA_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(18),
}


def render(example: str) -> str:
    """Return the .env text: the example with each empty secret filled in."""
    lines = []
    for line in example.splitlines():
        name, separator, value = line.partition("=")
        if separator and not line.startswith("#") and not value and name in GENERATORS:
            line = f"{name}={GENERATORS[name]()}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> int:
    if TARGET.exists():
        print(f"{TARGET} exists; leaving it as it is")
        return 0
    if not EXAMPLE.is_file():
        print(f"{EXAMPLE} not found; run this from the repository root", file=sys.stderr)
        return 1
    text = render(EXAMPLE.read_text(encoding="utf-8"))
    descriptor = os.open(TARGET, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    print(f"wrote {TARGET} with fresh random secrets (readable by you only)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
