"""Find what an artifact folder holds (an ONNX graph or TensorRT engines) and what it knows.

The runtime reads the stage manifests, never module globals: `export.json` (kiln export),
`optimize.json`/`manifest.json` (kiln optimize) next to a `model.onnx`, or `engine.json`
(kiln build) next to an `engine.plan`, possibly one engine folder per GPU profile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError

ONNX_MANIFESTS = ("export.json", "optimize.json", "manifest.json")
ENGINE_MANIFEST = "engine.json"


@dataclass(frozen=True)
class ArtifactInfo:
    """What the runtime needs to know about a folder before loading anything heavy."""

    path: Path
    kind: str  # "onnx" | "engine"
    manifest: dict[str, Any]
    max_context: int
    eos_ids: tuple[int, ...]
    pad_id: int
    engines: tuple[Path, ...] = ()  # engine folders (kind "engine")
    # Longrope (Phi-3) switches to its long factors once the sequence passes the original
    # context; transformers' Phi3 generate() then drops the cache and re-prefills once
    # (Phi3ForCausalLM.prepare_inputs_for_generation). The loop does the same at this position.
    reprefill_at: int | None = None
    # NTK "dynamic" RoPE reads the batch's longest position: finished rows must stay in it.
    keep_finished: bool = False

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
        manifest = _read(engines[0] / ENGINE_MANIFEST)
        return ArtifactInfo(
            path,
            "engine",
            manifest,
            _engine_max_context(manifest),
            *_special_ids(path, manifest),
            engines=tuple(engines),
        )
    for name in ONNX_MANIFESTS:
        if (path / name).is_file() and (path / "model.onnx").is_file():
            manifest = _read(path / name)
            return ArtifactInfo(
                path,
                "onnx",
                manifest,
                _onnx_max_context(path, manifest),
                *_special_ids(path, manifest),
                reprefill_at=_reprefill_at(path, manifest),
                keep_finished=_rope_type(_model_config(path, manifest)) == "dynamic",
            )
    raise ArtifactError(
        f"{path} holds neither model.onnx with a manifest ({', '.join(ONNX_MANIFESTS)}) nor "
        f"TensorRT engines ({ENGINE_MANIFEST} + engine.plan): it is incomplete or not a kiln "
        "artifact. Re-create it with `kiln export` or `kiln build`."
    )


def _engine_dirs(path: Path) -> list[Path]:
    if (path / ENGINE_MANIFEST).is_file():
        return [path]
    return sorted(p.parent for p in path.glob(f"*/{ENGINE_MANIFEST}"))


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rebuild the artifact.") from e


def _model_config(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(manifest.get("config") or {})
    if (path / "config.json").is_file():
        raw = _read(path / "config.json")
        cfg = {**raw, **cfg}
    return cfg


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})


def _rope_type(cfg: dict[str, Any]) -> str | None:
    rope = _rope(cfg)
    return rope.get("rope_type", rope.get("type"))


def _reprefill_at(path: Path, manifest: dict[str, Any]) -> int | None:
    cfg = _model_config(path, manifest)
    rope = _rope(cfg)
    if _rope_type(cfg) != "longrope":
        return None
    orig = rope.get("original_max_position_embeddings") or cfg.get(
        "original_max_position_embeddings"
    )
    return int(orig) if orig else None


def _onnx_max_context(path: Path, manifest: dict[str, Any]) -> int:
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


def _engine_max_context(manifest: dict[str, Any]) -> int:
    shapes = manifest.get("profile", {}).get("shapes") or []
    ctx = [int(s["max_context"]) for s in shapes if "max_context" in s]
    if not ctx:
        raise ArtifactError(
            "engine.json has no profile.shapes[].max_context; rebuild the engine with `kiln build`."
        )
    return min(ctx)


def _special_ids(path: Path, manifest: dict[str, Any]) -> tuple[tuple[int, ...], int]:
    """EOS ids (generation_config.json first, then the model config) and the padding id."""
    cfg = _model_config(path, manifest)
    gen = (
        _read(path / "generation_config.json")
        if (path / "generation_config.json").is_file()
        else {}
    )
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    pad = gen.get("pad_token_id", cfg.get("pad_token_id"))
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return eos_ids, int(pad)
