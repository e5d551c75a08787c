"""`kiln tune --measure`: replace a GPU profile's cost-model speeds by timings of its engines.

Runs only on a host whose GPU the profile targets (engines run only on the compute
capabilities they were built for, engine/manifest.py); anywhere else it stops with what to do.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import KilnError

if TYPE_CHECKING:
    from kiln.tune.search import Search, Trial


def gpu_compute_capability() -> str | None:
    """This host's first GPU's compute capability ("8.9"), or None without a GPU."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[0] if lines else None


def measure_engines(s: Search, built: list[Trial]) -> None:
    """Time each built engine through kiln's TensorRT runtime, interleaved; mark measured."""
    from kiln.tune.speed import Runner, time_runners

    profile = s.ctx.target.profile
    assert profile is not None
    cc = gpu_compute_capability()
    if cc is None:
        raise KilnError(
            f"--measure needs a GPU of profile {profile.name} (compute capability "
            f"{', '.join(profile.compute_capabilities)}); this host has none (no nvidia-smi "
            "answer). Run `kiln tune --measure` with the same arguments on such a host: the "
            "cached trials carry over when the out folder does."
        )
    if cc not in profile.compute_capabilities:
        raise KilnError(
            f"--measure: this GPU is compute capability {cc}, but profile {profile.name} "
            f"builds for {', '.join(profile.compute_capabilities)}; its engines cannot run here. "
            "Measure on a GPU the profile targets, or tune a profile for this GPU."
        )
    if not built:
        raise KilnError(
            f"--measure: no engine of profile {profile.name} was built; nothing to time."
        )
    paths = {t.candidate.key: Path((t.build or {})["path"]) for t in built}
    runners = [
        Runner(t.candidate.key, paths[t.candidate.key], 0, t.candidate["slots"]) for t in built
    ]
    result = time_runners(runners, s.ctx.workload, s.repeats, backend="tensorrt")
    for t in built:
        t.speed = {**result[t.candidate.key], "measured": True, "cost_model": t.speed}
