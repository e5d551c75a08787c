"""Optimize stage: an export artifact's ONNX in, a cleaned, fused, retyped ONNX out.

`optimize_model` loads the export's graph into onnx-ir, runs the passes for the target and
precision through `kiln.steps.run_steps` (each timed, each with its drift measured through
ONNX Runtime on fixed probe inputs and judged against kiln/parity.py TOL), checks the result
against PyTorch where the source model folder is still there, and publishes a folder shaped
like an export folder: model.onnx, optimize.json (written last), copies of export.json,
config.json, generation_config.json and tokenizer files.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.artifacts import cache_key, copy_carried_files, file_records, sha256_file, tool_versions
from kiln.errors import ArtifactError, ConfigError
from kiln.manifests import ExportManifest, OptimizeManifest
from kiln.parity import TOL
from kiln.precisions import OPTIMIZE_TARGETS, precision_named
from kiln.publish import publishing
from kiln.steps import StepRecord, run_steps

__all__ = ["TARGETS", "default_passes", "optimize_model"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TARGETS = OPTIMIZE_TARGETS
# protobuf cannot hold more than 2 GiB; larger graphs keep their weights in model.onnx.data.
EXTERNAL_DATA_BYTES = 1_800_000_000
_VERSIONED = ("kiln", "onnx", "onnxscript", "onnx-ir", "onnxruntime", "ml-dtypes")


def optimize_model(
    src_artifact_dir: Path,
    out_dir: Path,
    *,
    target: str = "tensorrt",
    precision: str = "fp16",
    passes: list[str] | None = None,
    skip: tuple[str, ...] = (),
    tied_embedding: str = "shared",
    allow_drift: bool = False,
    force: bool = False,
    check_torch: bool = True,
    pass_config: Mapping[str, Any] | None = None,
) -> Path:
    """Optimize the export artifact `src_artifact_dir` into `out_dir`; return `out_dir`.

    `passes` replaces the default pass list (`default_passes`); `skip` removes names from it.
    `tied_embedding="onehot"` adds the opt-in pass that lets TensorRT store a tied table once.
    Unchanged inputs (export hash, options, tool versions, code) reuse an existing artifact.
    `pass_config` is added to export.json's config for the passes that read options from it
    (calibration, weight budget: kiln/commands/compress.py).
    """
    from kiln.optimize.parity import check_against_reference

    src, out = Path(src_artifact_dir), Path(out_dir)
    _check_options(target, precision)
    export = _read_export(src)
    _check_source(target, export.precision, tied_embedding)
    names = _pass_names(passes, skip, precision, export.precision, tied_embedding, target)
    options = {
        "target": target,
        "precision": precision,
        "passes": names,
        "check_torch": check_torch,
        **({"pass_config": dict(pass_config)} if pass_config else {}),
    }
    versions = tool_versions(*_VERSIONED)
    export_sha = sha256_file(src / ExportManifest.FILE)
    key = cache_key("kiln.optimize", inputs=export_sha, options=options, versions=versions)
    with publishing(out, OptimizeManifest, key=key, force=force) as stage:
        if stage.reused:
            return out
        t0 = time.perf_counter()
        log.info("optimize %s -> %s [%s, %s]: %d passes", src, out, target, precision, len(names))
        model, records = _run_passes(src, export, names, precision, allow_drift, pass_config or {})
        onnx_path = stage.dir / MODEL_FILE
        _save(model, onnx_path)
        parity = check_against_reference(
            onnx_path, src, export, precision=precision, check_torch=check_torch
        )
        if not parity["ok"]:
            _fail_or_warn(parity, allow_drift)
        shutil.copy2(src / ExportManifest.FILE, stage.dir / ExportManifest.FILE)
        copy_carried_files(src, stage.dir)
        facts = {"records": records, "parity": parity, "t0": t0}
        stage.finish(_manifest(src, export, export_sha, onnx_path, options, versions, stage.key,
                               facts))  # fmt: skip
    log.info("optimize done in %.1f s -> %s", time.perf_counter() - t0, out / MODEL_FILE)
    return out


def _run_passes(
    src: Path,
    export: ExportManifest,
    names: list[str],
    precision: str,
    allow_drift: bool,
    pass_config: Mapping[str, Any],
) -> tuple[Any, list[StepRecord]]:
    """The export's graph after the passes, and each pass's record (counts, time, drift)."""
    import onnx_ir as ir

    from kiln.optimize.passes import build_passes

    model = ir.load(src / MODEL_FILE)
    steps = build_passes(
        names,
        precision=precision,
        source_precision=export.precision,
        config={**export.config, **pass_config},
    )
    probe = _probe(export, precision)
    return run_steps(steps, model, probe=probe, tolerances=TOL, allow_drift=allow_drift)


def _read_export(src: Path) -> ExportManifest:
    export = ExportManifest.read(src)
    if not (src / MODEL_FILE).is_file():
        raise ArtifactError(f"{src} has export.json but no {MODEL_FILE}; rerun `kiln export`.")
    return export


def default_passes(
    precision: str,
    source_precision: str = "fp32",
    *,
    tied_embedding: str = "shared",
    target: str = "tensorrt",
) -> list[str]:
    """The pass names run for `precision` on `target`, in order."""
    if target == "onnxruntime":
        from kiln.optimize.ort import ort_pass_names

        return ort_pass_names(precision)
    from kiln.optimize.passes import default_pass_names

    return default_pass_names(precision, source_precision, tied_embedding=tied_embedding)


def _check_options(target: str, precision: str) -> None:
    if target not in TARGETS:
        raise ConfigError(
            f"target {target!r} is not supported; kiln optimizes for {', '.join(TARGETS)}."
        )
    precision_named(precision, target=target)


def _check_source(target: str, source_precision: str, tied_embedding: str) -> None:
    if target != "onnxruntime":
        return
    if source_precision != "fp32":
        raise ConfigError(
            f"target 'onnxruntime' needs an fp32 export (this one is {source_precision}); "
            "re-export with `kiln export MODEL --precision fp32`."
        )
    if tied_embedding != "shared":
        raise ConfigError(
            "--tied-embedding onehot is a TensorRT workaround; target 'onnxruntime' keeps the "
            "shared table (drop the flag)."
        )


def _probe(export: ExportManifest, precision: str) -> Any:
    from kiln.optimize.probe import OnnxProbe

    # The probe feeds the layout of the graph it first sees (the source).
    return OnnxProbe(vocab=export.config["vocab"], prepare=_prepare_for_ort(precision))


def _pass_names(
    passes: list[str] | None,
    skip: tuple[str, ...],
    precision: str,
    source_precision: str,
    tied_embedding: str,
    target: str = "tensorrt",
) -> list[str]:
    from kiln.optimize.passes import PASSES

    if tied_embedding not in ("shared", "onehot"):
        raise ConfigError(f"tied_embedding {tied_embedding!r} must be 'shared' or 'onehot'.")
    names = (
        list(passes)
        if passes
        else default_passes(
            precision, source_precision, tied_embedding=tied_embedding, target=target
        )
    )
    unknown = [n for n in [*names, *skip] if n not in PASSES]
    if unknown:
        raise ConfigError(
            f"unknown pass(es) {', '.join(unknown)}; kiln knows {', '.join(sorted(PASSES))}."
        )
    return [n for n in names if n not in skip]


def _prepare_for_ort(precision: str) -> Any:
    if precision != "bf16":
        return None
    from kiln.optimize.precision.bf16 import bf16_emulation

    return bf16_emulation


def _save(model: Any, path: Path) -> None:
    import onnx_ir as ir

    size = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)
    if size > EXTERNAL_DATA_BYTES:
        ir.save(model, path, external_data=f"{path.name}.data")
    else:
        ir.save(model, path)


def _fail_or_warn(parity: dict[str, Any], allow_drift: bool) -> None:
    from kiln.errors import ParityError

    msg = f"optimized graph drifted past its budget against the reference: {parity['why']}"
    if not allow_drift:
        raise ParityError(f"{msg}\nRerun with --allow-drift to keep it (the manifest records it).")
    log.warning("%s; kept because of --allow-drift", msg)
    parity["allowed_drift"] = True


def _manifest(
    src: Path,
    export: ExportManifest,
    export_sha: str,
    onnx_path: Path,
    options: dict[str, Any],
    versions: dict[str, str],
    key: str,
    facts: dict[str, Any],
) -> OptimizeManifest:
    from kiln.graph_io import io_signature
    from kiln.optimize.passes import contrib_op_counts, engine_hints

    return OptimizeManifest(
        cache_key=key,
        source={
            "path": str(src),
            "export_json_sha256": export_sha,
            "model_sha256": export.main_file()[1],
            "precision": export.precision,
        },
        target=options["target"],
        precision=options["precision"],
        architecture=export.architecture,
        config=export.config,
        io=io_signature(onnx_path),
        engine_hints=engine_hints(onnx_path, options["precision"]),
        contrib_ops=contrib_op_counts(onnx_path),
        passes=[r.as_dict() for r in facts["records"]],
        files=file_records(onnx_path.parent, f"{MODEL_FILE}*"),
        versions=versions,
        parity=facts["parity"],
        elapsed_s=round(time.perf_counter() - facts["t0"], 3),
    )
