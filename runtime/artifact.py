"""Find what an artifact folder holds (an ONNX graph or TensorRT engines) and what it knows.

The runtime reads the stage manifests (kiln/manifests.py), never module globals: the newest of
`optimize.json` / `export.json` next to a `model.onnx`, or `engine.json` next to an
`engine.plan`, possibly one engine folder per GPU profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError
from kiln.layouts import CONCAT, KVLayout
from kiln.manifests import (
    EngineManifest,
    ExportManifest,
    OptimizeManifest,
    newest_manifest,
)

Manifest = ExportManifest | OptimizeManifest | EngineManifest
ENGINE_MANIFEST = EngineManifest.FILE


@dataclass(frozen=True)
class ArtifactInfo:
    """What the runtime needs to know about a folder before loading anything heavy."""

    path: Path
    kind: str  # "onnx" | "engine"
    manifest: Manifest  # the newest stage's (engine.json of the first engine folder)
    max_context: int
    eos_ids: tuple[int, ...]
    pad_id: int
    engines: tuple[Path, ...] = ()  # engine folders (kind "engine")
    # Longrope (Phi-3) switches to its long factors once the sequence passes the original
    # context; transformers' Phi3 generate() then drops the cache and re-prefills once
    # (Phi3ForCausalLM.prepare_inputs_for_generation). The loop does the same at this position.
    reprefill_at: int | None = None
    # The KV layout from the manifest's kv_cache (kiln/layouts.py): static runs natively over
    # slots, concat through runtime/concat_slots.py.
    layout: KVLayout = CONCAT

    @property
    def onnx_path(self) -> Path:
        """The ONNX graph of an ONNX artifact."""
        return self.path / "model.onnx"


def inspect_artifact(path: Path) -> ArtifactInfo:
    """Describe `path`, or raise an ArtifactError that says how to make a usable folder."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(
            f"Artifact folder {path} does not exist. Make one with `kiln export MODEL --out "
            f"{path}` (ONNX) or `kiln build` (TensorRT engines), or check the path."
        )
    engines = _engine_dirs(path)
    if engines:
        engine = EngineManifest.read(engines[0])
        static_ctx = engine.kv_cache["max_context"] if engine.layout.has_slots else None
        return ArtifactInfo(
            path,
            "engine",
            engine,
            static_ctx or _engine_max_context(engine),
            *_special_ids(path, engine),
            engines=tuple(engines),
            layout=engine.layout,
        )
    if (path / "model.onnx").is_file() and any(
        (path / m.FILE).is_file() for m in (OptimizeManifest, ExportManifest)
    ):
        onnx = newest_manifest(path)
        return ArtifactInfo(
            path,
            "onnx",
            onnx.newest,
            onnx.export.max_context or _onnx_max_context(path, onnx.newest),
            *_special_ids(path, onnx.newest),
            reprefill_at=_reprefill_at(path, onnx.newest),
            layout=onnx.layout,
        )
    raise ArtifactError(
        f"{path} holds neither model.onnx with a manifest (optimize.json, export.json) nor "
        f"TensorRT engines ({ENGINE_MANIFEST} + engine.plan): it is incomplete or not a kiln "
        "artifact. Re-create it with `kiln export` or `kiln build`."
    )


def _engine_dirs(path: Path) -> list[Path]:
    if (path / ENGINE_MANIFEST).is_file():
        return [path]
    return sorted(p.parent for p in path.glob(f"*/{ENGINE_MANIFEST}"))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild the artifact.") from e
    if not isinstance(data, dict):
        raise ArtifactError(
            f"{path} holds a JSON {type(data).__name__}, not an object; rebuild the artifact."
        )
    return data


def source_dirs(path: Path, manifest: Manifest) -> list[Path]:
    """Folders that may hold config/tokenizer files: the artifact, then an engine's ONNX source."""
    if isinstance(manifest, EngineManifest):
        return [path, Path(manifest.source["artifact"])]
    return [path]


def _find(path: Path, manifest: Manifest, name: str) -> Path | None:
    return next((d / name for d in source_dirs(path, manifest) if (d / name).is_file()), None)


def _model_config(path: Path, manifest: Manifest) -> dict[str, Any]:
    """config.json's keys, overridden by the manifest's model config (kiln's names)."""
    cfg = manifest.model_config if isinstance(manifest, EngineManifest) else dict(manifest.config)
    if (found := _find(path, manifest, "config.json")) is not None:
        cfg = {**_read(found), **cfg}
    return cfg


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})


def _rope_type(cfg: dict[str, Any]) -> str | None:
    rope = _rope(cfg)
    return rope.get("rope_type", rope.get("type"))


def _reprefill_at(path: Path, manifest: Manifest) -> int | None:
    cfg = _model_config(path, manifest)
    rope = _rope(cfg)
    if _rope_type(cfg) != "longrope":
        return None
    orig = rope.get("original_max_position_embeddings") or cfg.get(
        "original_max_position_embeddings"
    )
    return int(orig) if orig else None


def _onnx_max_context(path: Path, manifest: Manifest) -> int:
    cfg = _model_config(path, manifest)
    rope = _rope(cfg)
    for key in ("max_positions", "max_position_embeddings", "n_positions"):
        if cfg.get(key):
            if _rope_type(cfg) == "dynamic":
                # NTK scaling exists to run past the trained length: its design point is factor x.
                return int(cfg[key] * float(rope.get("factor", 1.0)))
            return int(cfg[key])
    raise ArtifactError(
        f"{path}: neither the manifest nor config.json gives the maximum context "
        "(max_position_embeddings); re-export the model."
    )


def _engine_max_context(manifest: EngineManifest) -> int:
    """The longest attention span every optimization profile accepts (total_sequence max)."""
    ctx = [int(p["axes"]["total_sequence"][2]) for p in manifest.optimization_profiles]
    if not ctx:
        raise ArtifactError(
            "engine.json has no optimization_profiles[].axes.total_sequence; rebuild the engine "
            "with `kiln build`."
        )
    return min(ctx)


def _special_ids(path: Path, manifest: Manifest) -> tuple[tuple[int, ...], int]:
    """EOS ids (generation_config.json first, then the model config) and the padding id."""
    cfg = _model_config(path, manifest)
    found = _find(path, manifest, "generation_config.json")
    gen = _read(found) if found is not None else {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)
