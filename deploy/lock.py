"""Write `deploy/requirements.lock`: the exact version of every distribution `corolla[api,gguf]` needs, read
from the virtual environment `make install` built and the tests ran in.

`make install` and the image both install through it as pip constraints (`-c`), so the image gets the
versions the tests passed on, and CI tests the versions the image gets. `make lock` rewrites it after a change
to pyproject.toml's dependencies (install first: the versions come from this environment); `--check` only
says whether it is current.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = Path(__file__).with_name("requirements.lock")
ROOT = "corolla[api,gguf]"  # what the image installs
HEADER = (
    "# The versions corolla[api,gguf] was tested with: `make lock` writes this file from the tested\n"
    "# environment (deploy/lock.py); `make install` and deploy/Dockerfile install through it (pip -c).\n"
)


def locked_versions(root: str = ROOT) -> dict[str, str]:
    """Canonical name -> installed version (without a local label such as +cpu) of `root`'s dependency
    closure in this environment, `root` itself excluded; markers are evaluated here, with each extra asked."""
    versions: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}
    pending = [Requirement(root)]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        asked = set(requirement.extras)
        if name in extras_seen and asked <= extras_seen[name]:
            continue
        extras_seen.setdefault(name, set()).update(asked)
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError as e:
            raise SystemExit(f"{requirement.name} is not installed: run `make install` first") from e
        versions[name] = Version(distribution.version).public
        for line in distribution.requires or []:
            needed = Requirement(line)
            extras = ("", *sorted(extras_seen[name]))
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                pending.append(needed)
    versions.pop(canonicalize_name(Requirement(root).name), None)
    return dict(sorted(versions.items()))


def lock_text(versions: dict[str, str]) -> str:
    return HEADER + "".join(f"{name}=={version}\n" for name, version in versions.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the lock differs; write nothing")
    args = parser.parse_args(argv)
    text = lock_text(locked_versions())
    if args.check:
        current = LOCK.read_text() if LOCK.exists() else ""
        if current != text:
            sys.stderr.write(f"{LOCK} is not current: run `make lock`\n")
            return 1
        return 0
    LOCK.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
