"""Write constraints.txt: the exact versions of everything kiln's extras pull in, as installed.

Run with the tested environment's Python (`.venv/bin/python .ci/freeze_constraints.py`) after a
change of dependency ranges in pyproject.toml: it walks kiln's requirements (every extra)
through the installed distributions' metadata, so tools installed beside kiln stay out.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("export", "engine", "serve", "ray", "dev")


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req, maxsplit=1)[0].lower().replace("_", "-")


def _wanted(req: str, extras: tuple[str, ...]) -> bool:
    """A requirement applies when it has no marker, or its extra marker names one of `extras`."""
    if ";" not in req:
        return True
    marker = req.split(";", 1)[1]
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if extra:
        return extra.group(1) in extras
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def closure() -> dict[str, str]:
    """Installed name -> version of kiln's requirements (all extras), transitively."""
    seen: dict[str, str] = {}
    todo = [(r, EXTRAS) for r in metadata.requires("kiln") or []]
    while todo:
        req, extras = todo.pop()
        if not _wanted(req, extras):
            continue
        name = _name(req)
        wanted_extras = tuple(re.findall(r"\[([^\]]+)\]", req.split(";")[0])[:1])
        sub = tuple(e.strip() for e in wanted_extras[0].split(",")) if wanted_extras else ()
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a requirement for another platform or Python
        if name in seen and not sub:
            continue
        seen[name] = dist.version
        todo += [(r, sub) for r in dist.requires or []]
    return seen


def main() -> int:
    """Write constraints.txt beside pyproject.toml."""
    pins = closure()
    lines = [
        "# The exact set the test suite ran against: kiln's dependencies with every extra.",
        "# `make setup` and CI install with `-c constraints.txt`; pyproject.toml holds the ranges.",
        "# Regenerate from the tested .venv: .venv/bin/python .ci/freeze_constraints.py",
    ]
    for name in sorted(pins.keys() - {"kiln"}):  # an extra may name another: kiln[serve]
        version = pins[name].split("+")[0]  # torch 2.13.0+cpu: the local label is the build
        lines.append(f"{name}=={version}")
    (ROOT / "constraints.txt").write_text("\n".join(lines) + "\n")
    print(f"{len(pins)} pins -> {ROOT / 'constraints.txt'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
