"""Prints the project's runtime requirements, one per line, from pyproject.toml.

The image installs these before it copies the code (so a code change rebuilds one small layer),
and the offline build puts exactly these, as wheels, into the wheelhouse:

    python3 deploy/docker/requirements.py pyproject.toml [--without torch]

Standard library only: it runs in the bare base image too.
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: str, without: set[str]) -> list[str]:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    kept = []
    for requirement in project["dependencies"]:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
        if name not in without:
            kept.append(requirement)
    return kept


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    without = {argv[i + 1].lower() for i, arg in enumerate(argv) if arg == "--without"}
    print("\n".join(requirements(argv[0], without)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
