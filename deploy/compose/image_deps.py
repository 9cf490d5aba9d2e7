"""The image's requirement lists, read from pyproject.toml (the one list of dependencies).

`python image_deps.py pyproject.toml llama` prints the llama-cpp-python requirement (the Dockerfile compiles it
into a wheel in its own cached layer); `... rest --skip NAME ...` prints every other dependency except NAME
(the model packages: models come from a volume, not from the image). Standard library only: it runs in the
builder stage before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

COMPILED = "llama-cpp-python"


def name_of(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503: case and -_. folded)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def select(dependencies: list[str], part: str, skip: list[str]) -> list[str]:
    skipped = {name_of(s) for s in skip}
    if part == "llama":
        return [d for d in dependencies if name_of(d) == COMPILED]
    return [d for d in dependencies if name_of(d) != COMPILED and name_of(d) not in skipped]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pyproject")
    ap.add_argument("part", choices=["llama", "rest"])
    ap.add_argument("--skip", nargs="*", default=[], help="distribution names to leave out of `rest`")
    args = ap.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    chosen = select(dependencies, args.part, args.skip)
    if not chosen:
        print(f"error: no {args.part} dependencies in {args.pyproject}", file=sys.stderr)
        return 1
    print("\n".join(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
