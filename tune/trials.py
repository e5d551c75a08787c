"""The trial cache: one JSON file per finished trial, named by its content key.

A trial is any unit of work whose result tune reuses: an optimize, a proxy or full eval, an
engine build, a timing round. Its key hashes what it depends on (the model, the tune code and
every kiln module it imports, tool versions, and the trial's own spec: kiln/artifacts.py
cache_key), so an interrupted tune continues where it stopped and a rerun with the same inputs
computes nothing. Each file is written atomically when its trial ends.
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


class TrialStore:
    """Trials of one model under `root`; counts what it computed and what it reused."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        files = [p for p in Path(model).iterdir() if p.is_file()]
        versions = tool_versions("onnxruntime", "onnx", "onnx-ir", "onnxscript", "tensorrt-rtx")
        self.base = cache_key(
            "kiln.tune", inputs=sha256_files(files, Path(model)), options={}, versions=versions
        )
        self.computed: list[str] = []
        self.reused: list[str] = []

    def key(self, kind: str, spec: dict[str, Any]) -> str:
        """The content key of one trial."""
        return sha256_json({"base": self.base, "kind": kind, "spec": spec})[:24]

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
