"""The three stage manifests as frozen, versioned records: export.json, optimize.json, engine.json.

Each record reads and writes one JSON file whose keys are the record's fields plus `kind` and
`format`. Reading refuses, naming the file and the command that remakes it, a file of another
kind, of another format (folders from before the `format` field count as format 1) or one that
lacks a field a reader relies on; no reader falls back to a silent default. The nested records
(config, io, kv_cache, ...) stay JSON objects; the values stages read from them have properties
here, checked when the file is read (`REQUIRED`).

`newest_manifest` is the one rule for an ONNX folder: optimize.json over export.json, and an
optimized folder carries a copy of its export.json (the KV layout lives there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self

from kiln.artifacts import write_json_atomic
from kiln.errors import ArtifactError
from kiln.layouts import KVLayout, layout_named

MODEL_FILE = "model.onnx"


def read_json(path: Path, *, made_by: str) -> dict[str, Any]:
    """Load one JSON file, or raise an ArtifactError naming the command that makes it."""
    if not path.is_file():
        raise ArtifactError(
            f"{path.parent} has no {path.name}: it is missing or incomplete; create it with "
            f"`{made_by}`."
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"{path} is not valid JSON ({e}); delete it and rerun `{made_by}`."
        ) from e
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not a JSON object; delete it and rerun `{made_by}`.")
    return data


@dataclass(frozen=True)
class Manifest:
    """Base of the stage records: `read`, `write`, and the file a reuse check compares."""

    FILE: ClassVar[str]
    KIND: ClassVar[str]
    FORMAT: ClassVar[int]
    MADE_BY: ClassVar[str]  # the command that (re)makes the file, for error messages
    REQUIRED: ClassVar[tuple[tuple[str, ...], ...]] = ()  # nested keys readers rely on

    cache_key: str

    @classmethod
    def read(cls, folder: Path) -> Self:
        """Load `folder/FILE`; refuse another kind, another format or a missing field."""
        path = Path(folder) / cls.FILE
        data = read_json(path, made_by=cls.MADE_BY)
        fix = f"re-run `{cls.MADE_BY}`"
        if data.get("kind") != cls.KIND:
            raise ArtifactError(
                f"{path} is not a {cls.KIND} manifest (kind {data.get('kind')!r}); {fix}."
            )
        fmt = data.get("format", 1)  # files from before the format field
        if fmt != cls.FORMAT:
            raise ArtifactError(
                f"{path} has format {fmt}; this kiln reads format {cls.FORMAT}: {fix}."
            )
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        missing += [".".join(p) for p in cls.REQUIRED if p[0] in data and not _has(data, p)]
        if missing:
            raise ArtifactError(f"{path} has no {', '.join(missing)}; {fix}.")
        return cls(**{n: data[n] for n in names})

    def write(self, folder: Path) -> None:
        """Write `folder/FILE` atomically: kind, format, then the fields in order."""
        data = {"kind": self.KIND, "format": self.FORMAT}
        data.update({f.name: getattr(self, f.name) for f in fields(self)})
        write_json_atomic(Path(folder) / self.FILE, data)

    def main_file(self) -> tuple[str, str]:
        """(name, sha256) of the file the manifest vouches for; a reuse check rehashes it."""
        raise NotImplementedError


def _has(data: dict[str, Any], path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return False
        data = data[key]
    return True


@dataclass(frozen=True)
class ExportManifest(Manifest):
    """export.json: the traced graph, the model it came from, and its parity against PyTorch."""

    FILE: ClassVar[str] = "export.json"
    KIND: ClassVar[str] = "kiln.export"
    FORMAT: ClassVar[int] = 2  # 1: before the format field
    MADE_BY: ClassVar[str] = "kiln export"
    REQUIRED: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("source", "path"),
        ("config", "vocab"),
        ("exporter", "precision"),
        ("kv_cache", "layout"),
        ("files", MODEL_FILE, "sha256"),
    )

    source: dict[str, Any]
    architecture: dict[str, Any]
    config: dict[str, Any]
    exporter: dict[str, Any]
    io: dict[str, list[dict[str, Any]]]
    dynamic_axes: dict[str, str]
    files: dict[str, dict[str, Any]]
    versions: dict[str, str]
    kv_cache: dict[str, Any]
    rope: dict[str, Any]
    weight_bytes: int
    parity: dict[str, Any]
    elapsed_s: dict[str, float]

    @property
    def precision(self) -> str:
        """The precision the graph was exported in."""
        return str(self.exporter["precision"])

    @property
    def layout(self) -> KVLayout:
        """The graph's KV-cache layout."""
        return layout_named(self.kv_cache["layout"], where=f"{self.FILE} kv_cache.layout")

    @property
    def max_context(self) -> int | None:
        """The slot buffers' fixed length (static layout), else None."""
        return int(self.kv_cache["max_context"]) if self.layout.has_slots else None

    def main_file(self) -> tuple[str, str]:  # noqa: D102
        return MODEL_FILE, self.files[MODEL_FILE]["sha256"]


@dataclass(frozen=True)
class OptimizeManifest(Manifest):
    """optimize.json: the passes run on an export's graph, their drift, and hints for the engine."""

    FILE: ClassVar[str] = "optimize.json"
    KIND: ClassVar[str] = "kiln.optimize"
    FORMAT: ClassVar[int] = 2  # 1: before the format field
    MADE_BY: ClassVar[str] = "kiln optimize"
    REQUIRED: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("engine_hints", "attention_decomposable"),
        ("engine_hints", "min_compute_capability"),
        ("files", MODEL_FILE, "sha256"),
    )

    source: dict[str, Any]
    target: str
    precision: str
    architecture: dict[str, Any]
    config: dict[str, Any]
    io: dict[str, list[dict[str, Any]]]
    engine_hints: dict[str, Any]
    contrib_ops: dict[str, int]
    passes: list[dict[str, Any]]
    files: dict[str, dict[str, Any]]
    versions: dict[str, str]
    parity: dict[str, Any]
    elapsed_s: float

    @property
    def attention_decomposable(self) -> bool:
        """True when the engine must mark every attention layer decomposable."""
        return bool(self.engine_hints["attention_decomposable"])

    @property
    def min_compute_capability(self) -> str:
        """The oldest GPU generation the graph's types compile for, as "SM89"."""
        return str(self.engine_hints["min_compute_capability"])

    def main_file(self) -> tuple[str, str]:  # noqa: D102
        return MODEL_FILE, self.files[MODEL_FILE]["sha256"]


@dataclass(frozen=True)
class EngineManifest(Manifest):
    """engine.json: targets, library, precision, I/O and shape ranges of one TensorRT plan."""

    FILE: ClassVar[str] = "engine.json"
    KIND: ClassVar[str] = "kiln.engine"
    FORMAT: ClassVar[int] = 2  # 2: kv_cache, attention, layer_types
    MADE_BY: ClassVar[str] = "kiln build ARTIFACT --profile NAME"
    REQUIRED: ClassVar[tuple[tuple[str, ...], ...]] = (
        ("profile", "name"),
        ("library", "name"),
        ("library", "version"),
        ("kv_cache", "layout"),
        ("plan", "bytes"),
        ("plan", "sha256"),
    )

    source: dict[str, Any]
    profile: dict[str, Any]
    library: dict[str, str]
    compute_capabilities: list[str]
    precision: dict[str, Any]
    io: dict[str, list[dict[str, Any]]]
    kv_cache: dict[str, Any]
    attention: dict[str, Any]
    optimization_profiles: list[dict[str, Any]]
    plan: dict[str, Any]
    build: dict[str, Any]

    @property
    def layout(self) -> KVLayout:
        """The engine's KV-cache layout."""
        return layout_named(self.kv_cache["layout"], where=f"{self.FILE} kv_cache.layout")

    @property
    def profile_name(self) -> str:
        """The GPU profile the engine was built for."""
        return str(self.profile["name"])

    @property
    def model_config(self) -> dict[str, Any]:
        """The model config of the ONNX folder the engine was built from."""
        return dict(self.source["config"])

    def main_file(self) -> tuple[str, str]:  # noqa: D102
        return str(self.plan["file"]), str(self.plan["sha256"])


@dataclass(frozen=True)
class OnnxManifests:
    """What an ONNX folder says about itself: its newest manifest and its export's."""

    folder: Path
    newest: ExportManifest | OptimizeManifest
    export: ExportManifest

    @property
    def stage(self) -> str:
        """The stage that made the folder's model.onnx: "export" or "optimize"."""
        return self.newest.KIND.removeprefix("kiln.")

    @property
    def config(self) -> dict[str, Any]:
        """The model config (vocab, layers, heads, max_positions, ...)."""
        return self.newest.config

    @property
    def io(self) -> dict[str, list[dict[str, Any]]]:
        """The graph's inputs and outputs (name, dtype, shape)."""
        return self.newest.io

    @property
    def layout(self) -> KVLayout:
        """The graph's KV-cache layout (export.json's; optimizing keeps it)."""
        return self.export.layout


def newest_manifest(folder: Path) -> OnnxManifests:
    """The manifests of an ONNX folder: optimize.json over export.json (it carries a copy)."""
    folder = Path(folder)
    if not (folder / MODEL_FILE).is_file():
        raise ArtifactError(
            f"{folder} has no {MODEL_FILE}; pass a folder made by `kiln export` or `kiln optimize`."
        )
    has = [m for m in (OptimizeManifest, ExportManifest) if (folder / m.FILE).is_file()]
    if not has:
        raise ArtifactError(
            f"{folder} has {MODEL_FILE} but no export.json or optimize.json: it is incomplete or "
            "not made by kiln; rerun `kiln export` (or `kiln optimize`)."
        )
    export = ExportManifest.read(folder)
    newest = OptimizeManifest.read(folder) if has[0] is OptimizeManifest else export
    return OnnxManifests(folder, newest, export)
