"""The trial cache: one JSON file per finished trial, named by its content key.

A trial is any unit of work whose result tune reuses: an export, an optimize, a proxy or full
eval, an engine build, a timing round. Its key hashes what it depends on (the model's files,
tool versions, the trial's own spec, and the sources of the stage package that does the work
and every kiln module it imports: kiln/artifacts.py cache_key), so an interrupted tune
continues where it stopped, a rerun with the same inputs computes nothing, and a change to how
tune chooses (tune/choose.py) reuses every measurement. Each file is written atomically when
its trial ends.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kiln.artifacts import cache_key, sha256_files, sha256_json, tool_versions, write_json_atomic

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
# tune's own modules that do a trial's work (the rest only choose and report).
TUNE_SOURCES = [_HERE / "make.py", _HERE / "speed.py"]
# The stage package whose code makes each kind of trial.
PACKAGES = {
    "prune": "kiln.compress",
    "export": "kiln.export",
    "optimize": "kiln.optimize",
    "proxy": "kiln.evaluate",
    "full": "kiln.evaluate",
    "engine": "kiln.engine",
    "timing": "kiln.runtime",
}


class TrialStore:
    """Trials of one model under `root`; counts what it computed and what it reused."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        files = [p for p in Path(model).iterdir() if p.is_file()]
        self.model_sha = sha256_files(files, Path(model))
        self.versions = tool_versions(
            "onnxruntime", "onnx", "onnx-ir", "onnxscript", "tensorrt-rtx"
        )
        self._bases: dict[str, str] = {}
        self.computed: list[str] = []
        self.reused: list[str] = []

    def key(self, kind: str, spec: dict[str, Any]) -> str:
        """The content key of one trial."""
        package = PACKAGES[kind]
        if package not in self._bases:  # fingerprinting reads every source file: once each
            inputs = {"model": self.model_sha, "tune": sha256_files(TUNE_SOURCES, _HERE)}
            self._bases[package] = cache_key(
                package, inputs=inputs, options={}, versions=self.versions
            )
        return sha256_json({"base": self._bases[package], "kind": kind, "spec": spec})[:24]

    def run(
        self, kind: str, spec: dict[str, Any], work: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The cached result of (kind, spec), or `work()`'s, timed and stored."""
        key = self.key(kind, spec)
        path = self.root / f"{kind}-{key}.json"
        if path.is_file():
            self.reused.append(key)
            result: dict[str, Any] = json.loads(path.read_text())["result"]
            return result
        t0 = time.perf_counter()
        result = work()
        result["elapsed_s"] = round(time.perf_counter() - t0, 3)
        write_json_atomic(path, {"kind": kind, "key": key, "spec": spec, "result": result})
        self.computed.append(key)
        return result
