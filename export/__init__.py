"""Export stage: a Hugging Face causal LM folder becomes one ONNX graph with a KV cache.

`export_model` loads the model, traces it (onnx_from_hf), checks the graph against PyTorch
through ONNX Runtime (check), and publishes the folder atomically with `export.json` last.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from kiln.artifacts import cache_key, copy_carried_files, file_records, tool_versions
from kiln.errors import ConfigError, UnsupportedModelError
from kiln.export.check import check_against_source, check_parity
from kiln.export.layouts import export_layout
from kiln.export.onnx_from_hf import onnx_from_hf
from kiln.export.patches import SEQUENCE_DEPENDENT_ROPE
from kiln.export.source import Source, describe_source, load_model
from kiln.graph_io import io_signature
from kiln.layouts import CONCAT, KVLayout, layout_named
from kiln.log import timed
from kiln.manifests import ExportManifest
from kiln.publish import publishing

__all__ = ["check_against_source", "export_model"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
_VERSIONED = ("kiln", "torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime")


def export_model(
    source: Path,
    out: Path,
    *,
    precision: str = "fp32",
    opset: int | None = None,
    kv: str = CONCAT.name,
    max_context: int | None = None,
    allow_drift: bool = False,
    force: bool = False,
) -> Path:
    """Export the model folder `source` to the artifact folder `out`; return `out`.

    `kv` names the KV-cache layout (kiln/layouts.py): concat takes and returns a growing cache,
    static takes preallocated [batch, kv_heads, max_context, head_dim] buffers and writes them
    in place. Unchanged inputs (model files, options, tool versions) reuse the existing artifact.
    """
    source, out = Path(source), Path(out)
    t0 = time.perf_counter()
    layout = layout_named(kv)
    opset = layout.check_options(max_context, opset)
    src = describe_source(source)
    options = {"precision": precision, "opset": opset, "exporter": "torch.onnx dynamo", "kv": kv}
    if layout.has_slots:
        options["max_context"] = max_context
    versions = tool_versions(*_VERSIONED)
    key = cache_key("kiln.export", inputs=src.sha256, options=options, versions=versions)
    with publishing(out, ExportManifest, key=key, force=force) as stage:
        if stage.reused:
            return out
        log.info(
            "export %s (%s) -> %s [%s, opset %d]", source, src.family.name, out, precision, opset
        )
        times: dict[str, float] = {}
        with timed("load model", times, "load"):
            model = load_model(source)
        shape = src.family.shape(model.config)
        rope = _check_rope(src, model.config)
        _check_context(src, shape, layout, max_context)
        onnx_path = stage.dir / MODEL_FILE
        with timed("trace and export to ONNX", times, "export"):
            weight_bytes = onnx_from_hf(
                model, shape, onnx_path, precision=precision, opset=opset, layout=layout,
                max_context=max_context,
            )  # fmt: skip
        what = f"Exported graph of {source}"
        parity = _check_parity(onnx_path, model, shape, layout, options, (what, allow_drift), times)
        copy_carried_files(source, stage.dir)
        times["total"] = round(time.perf_counter() - t0, 3)
        facts = {"rope": rope, "weight_bytes": weight_bytes, "parity": parity, "elapsed_s": times}
        stage.finish(_manifest(src, model.config, shape, onnx_path, options, versions, stage.key,
                               facts))  # fmt: skip
    log.info("export done in %.1f s -> %s", times["total"], out / MODEL_FILE)
    return out


def _check_context(src: Source, shape: Any, layout: KVLayout, max_context: int | None) -> None:
    if (
        layout.has_slots
        and shape.max_positions
        and max_context
        and max_context > shape.max_positions
    ):
        where = f"max_position_embeddings {shape.max_positions} ({src.path / 'config.json'})"
        if src.family.positions == "learned":  # no embedding row exists past the table
            raise ConfigError(
                f"--max-context {max_context} exceeds the model's {where}; choose at most that."
            )
        log.warning("max context %d exceeds the model's %s", max_context, where)


def _check_parity(
    onnx_path: Path,
    model: Any,
    shape: Any,
    layout: KVLayout,
    options: dict[str, Any],
    judge: tuple[str, bool],
    times: dict[str, float],
) -> dict[str, Any]:
    """The graph against PyTorch along the layout's parity plan; the manifest's parity record."""
    graph, allow_drift = judge
    plan = export_layout(layout).parity
    with timed(f"parity against PyTorch ({plan.describe()})", times, "check"):
        report, steps = check_parity(
            onnx_path, model, shape, precision=options["precision"], plan=plan
        )
    log.info("parity: %s", report.describe())
    if allow_drift and not report.ok:
        log.warning("parity failed but --allow-drift keeps the artifact")
    else:
        report.raise_if_failed(graph)
    return {**report.summary(), "allowed_drift": allow_drift and not report.ok, "steps": steps}


def _check_rope(src: Source, config: Any) -> str | None:
    rope = src.family.rope_type(config)
    allowed = (*src.family.rope_types, *SEQUENCE_DEPENDENT_ROPE)
    if rope is not None and rope not in allowed:
        raise UnsupportedModelError(
            f"RoPE type {rope!r} ({src.path / 'config.json'} rope_parameters) is not supported for "
            f"{src.family.name}; kiln exports {', '.join(allowed)}."
        )
    return rope


def _manifest(
    src: Source,
    config: Any,
    shape: Any,
    onnx_path: Path,
    options: dict[str, Any],
    versions: dict[str, str],
    key: str,
    facts: dict[str, Any],
) -> ExportManifest:
    rope = facts["rope"]
    return ExportManifest(
        cache_key=key,
        source={"path": str(src.path), "sha256": src.sha256, "files": src.files},
        architecture={
            "family": src.family.name,
            "model_type": config.model_type,
            "class": (config.architectures or ["?"])[0],
            "norm": src.family.norm,
            "mlp": src.family.mlp,
            "positions": src.family.positions,
            "qk_norm": src.family.qk_norm,
        },
        config={
            **vars(shape),
            "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
            "sliding_window": getattr(config, "sliding_window", None),
            "bos_token_id": getattr(config, "bos_token_id", None),
            "eos_token_id": getattr(config, "eos_token_id", None),
        },
        exporter=options,
        io=io_signature(onnx_path),
        dynamic_axes={
            "batch": "rows in the batch",
            "sequence": "new tokens this call (prompt length at prefill, 1 at decode)",
            "past_sequence": "tokens already in the KV cache (0 at prefill)",
            "total_sequence": "past_sequence + sequence (attention_mask length)",
        },
        files=file_records(onnx_path.parent, f"{MODEL_FILE}*"),
        versions=versions,
        kv_cache=layout_named(options["kv"]).record(options.get("max_context")),
        rope={"type": rope, "in_graph": rope in SEQUENCE_DEPENDENT_ROPE},
        weight_bytes=facts["weight_bytes"],
        parity=facts["parity"],
        elapsed_s=facts["elapsed_s"],
    )
