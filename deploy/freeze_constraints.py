"""Write constraints.txt: the runtime dependencies of online-ctr[serve], pinned to this venv.

The container image installs exactly these versions, so it runs what the
tests ran. The list is ``pip freeze`` narrowed to the packages that
``online-ctr[serve]`` needs at run time, found by walking the requirements in
the installed metadata. Test and lint tools are left out.

Run it from the repository root with the project's venv, after
``pip install -e '.[serve,test]'``::

    .venv/bin/python deploy/freeze_constraints.py > constraints.txt
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "online-ctr"
EXTRAS = ("serve",)


def _requirements(distribution: str, extras: tuple[str, ...]) -> list[Requirement]:
    """Return the requirements of an installed distribution that apply with these extras."""
    needed = []
    for text in metadata.requires(distribution) or ():
        requirement = Requirement(text)
        marker = requirement.marker
        if marker is None:
            needed.append(requirement)
            continue
        environments = [{"extra": extra} for extra in extras] or [{"extra": ""}]
        if any(marker.evaluate(environment) for environment in environments):
            needed.append(requirement)
    return needed


def runtime_closure(project: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Return ``{canonical name: installed version}`` for every runtime dependency of ``project``.

    Raises PackageNotFoundError when a dependency is not installed, because a
    pin can only come from an installed version.
    """
    pinned: dict[str, str] = {}
    pending = [(project, extras)]
    while pending:
        distribution, wanted_extras = pending.pop()
        for requirement in _requirements(distribution, wanted_extras):
            name = canonicalize_name(requirement.name)
            if name in pinned:
                continue
            pinned[name] = metadata.version(requirement.name)
            pending.append((requirement.name, tuple(sorted(requirement.extras))))
    pinned.pop(canonicalize_name(project), None)
    return pinned


def main() -> int:
    pinned = runtime_closure(PROJECT, EXTRAS)
    print(f"# Runtime dependencies of {PROJECT}[{','.join(EXTRAS)}], pinned to the tested venv.")
    print("# Regenerate: .venv/bin/python deploy/freeze_constraints.py > constraints.txt")
    for name in sorted(pinned):
        print(f"{name}=={pinned[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
