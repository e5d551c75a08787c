"""Build several GPU profiles from one or more artifacts and tabulate the results.

Each profile needs an artifact of its own precision (TensorRT takes the precision from the
ONNX types), so with several artifacts (say an fp16 export and an int8 weight-only optimize)
each profile gets the one whose graph has its precision. Profiles whose backend is not
installed here (full TensorRT for data-center GPUs) are listed as skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from kiln.engine import build_engine, read_engine
from kiln.engine.builder import Backend
from kiln.engine.precision import precision_of
from kiln.engine.profiles import GpuProfile, available_profiles, load_profile
from kiln.errors import KilnError
from kiln.manifests import newest_manifest

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One line of the matrix table."""

    profile: str
    precision: str
    targets: str
    status: str  # built, up to date, skipped: ..., FAILED: ...
    artifact: str = ""
    size_mb: float | None = None
    build_s: float | None = None

    @property
    def ok(self) -> bool:
        """True when the engine exists now."""
        return self.status in ("built", "up to date")


def resolve_profiles(names: list[str]) -> list[GpuProfile]:
    """Profile names or TOML paths, comma-separated or repeated; 'all' is every shipped one."""
    flat = [n for name in names for n in name.split(",") if n]
    if "all" in flat:
        flat = [n for n in flat if n != "all"] + available_profiles()
    seen: dict[str, GpuProfile] = {}
    for n in flat:
        p = load_profile(n)
        seen.setdefault(p.name, p)
    return list(seen.values())


def build_matrix(
    artifacts: list[Path], profiles: list[GpuProfile], out: Path, *, force: bool = False
) -> list[Row]:
    """Build every profile into `out/<profile>/` from the artifact of its precision."""
    for a in artifacts:
        newest_manifest(a)  # a missing or unfinished folder is an error before any build starts
    labels: dict[Path, str] = {}
    rows = []
    for gpu in profiles:
        row = Row(gpu.name, gpu.precision, "+".join(gpu.compute_capabilities), "")
        rows.append(row)
        if importlib.util.find_spec(gpu.module) is None:
            row.status = f"skipped: needs {gpu.module} (a {gpu.backend} host)"
            continue
        try:
            # One artifact for one profile: build_engine gives the full mismatch error.
            single = len(artifacts) == 1 and len(profiles) == 1
            artifact = artifacts[0] if single else _pick(artifacts, gpu, labels)
            if artifact is None:
                have = ", ".join(sorted(set(labels.values()))) or "none"
                row.status = f"skipped: no {gpu.precision} artifact (have {have})"
                continue
            row.artifact = str(artifact)
            folder = out / gpu.name
            before = _key(folder)
            build_engine(artifact, gpu, folder, force=force)
            manifest = read_engine(folder, verify=False)
            row.status = "up to date" if before == manifest.cache_key else "built"
            row.size_mb = manifest.plan["bytes"] / 1e6
            row.build_s = manifest.build["elapsed_s"]["build"]
        except KilnError as e:
            log.error("%s", e)
            row.status = "FAILED: " + str(e).splitlines()[0][:80]
    return rows


def format_table(rows: list[Row]) -> str:
    """A fixed-width table: profile, precision, targets, size, build time, status."""
    head = f"{'profile':<24} {'precision':<9} {'targets':<10} {'size':>9} {'build':>7}  status"
    lines = [head, "-" * len(head)]
    for r in rows:
        size = f"{r.size_mb:.1f} MB" if r.size_mb is not None else "-"
        secs = f"{r.build_s:.1f} s" if r.build_s is not None else "-"
        lines.append(
            f"{r.profile:<24} {r.precision:<9} {r.targets:<10} {size:>9} {secs:>7}  {r.status}"
        )
    return "\n".join(lines)


def _pick(artifacts: list[Path], gpu: GpuProfile, labels: dict[Path, str]) -> Path | None:
    """The artifact whose graph precision is the profile's (parsed once per artifact)."""
    for a in artifacts:
        if a not in labels:
            backend = Backend(gpu)
            labels[a] = precision_of(backend, backend.parse(a / "model.onnx")).label
        if labels[a] == gpu.precision:
            return a
    return None


def _key(folder: Path) -> str | None:
    try:
        return read_engine(folder, verify=False).cache_key
    except KilnError:
        return None
