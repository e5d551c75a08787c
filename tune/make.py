"""Make what a candidate needs, through the stages' own entry points.

The fp32 export per KV layout (`kiln.export.export_model`), the candidate's graph
(`kiln.optimize.optimize_model` with the recipe's options), its engine for a GPU profile at the
candidate's precision (`kiln.engine.build_engine`), and its quality (`kiln.evaluate`). Each
stage reuses an unchanged output by its own cache key; tune's trial cache (tune/trials.py)
records the figures.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from kiln.evaluate import PROMPT_TOKENS, EvalOptions
from kiln.tune.recipe import CALIB_LENGTH, CALIB_SEQUENCES, ExportSection, OptimizeSection
from kiln.tune.space import Candidate, Context, knob_methods, needs_calibration, prune_spec

# The proxy: a short text, one prompt; the full protocol: kiln eval's defaults on more text.
PROXY = EvalOptions(tokens=512, window=128, stride=64, prompts=1, greedy_tokens=16)
FULL = EvalOptions(tokens=4096)


def export_section(c: Candidate, ctx: Context, full: EvalOptions) -> ExportSection:
    """The export a candidate starts from: concat, or static slots long enough for the eval.

    A pruning candidate exports the pruned model (`prune`: its compress/prune.py fractions).
    """
    pruned = _prune_text(c["prune"])
    if c["kv"] == "concat":
        return ExportSection("concat", prune=pruned)
    need = max(ctx.workload.context, full.window, PROMPT_TOKENS + full.greedy_tokens)
    top = ctx.shape.max_positions or need
    return ExportSection("static", max_context=min(need, top), prune=pruned)


def _prune_text(value: Any) -> str:
    """The empty string for no pruning, else "layers=0,kv_groups=0,mlp=0.083333"."""
    if not prunes_value(value):
        return ""
    return ",".join(f"{k}={v:g}" for k, v in asdict(prune_spec(value)).items())


def prunes_value(value: Any) -> bool:
    """Whether a prune knob value cuts anything."""
    return any(asdict(prune_spec(value)).values())


def make_pruned(model: Path, prune: str, calibration: Path, out: Path) -> dict[str, Any]:
    """`kiln prune` of `model` by the fractions `prune`, measured on the calibration text.

    Windows as the calibrated passes use (CALIB_SEQUENCES x CALIB_LENGTH); no gate: the eval
    against the unpruned fp32 export judges the result.
    """
    from kiln.compress import prune_model

    record = prune_model(
        model, out, calibration=calibration, spec=prune_spec(prune),
        sequences=CALIB_SEQUENCES, length=CALIB_LENGTH,
    )  # fmt: skip
    keys = ("params_before", "params_after", "gate", "cuts")
    return {"path": str(out), **{k: record[k] for k in keys if k in record}}


# Mixed precision's weight budget: this far from the all-int4 graph's weight bytes to the
# all-int8 one's (0.5: the midpoint), counted as optimize/mixed.py counts them.
MIXED_FRACTION = 0.5


def mixed_budget_mib(export: Path, target: str) -> float:
    """`weight_budget_mib` of a `method = mixed` candidate (MIXED_FRACTION, the export's groups).

    Bytes per group from optimize/mixed.py (`groups_of`, `_level_bytes`) at the float width the
    pass sees on `target` (kiln/precisions.py int4 activations on tensorrt, fp32 on
    onnxruntime); other initializers scaled to that width.
    """
    import onnx_ir as ir

    from kiln.optimize.mixed import MIB, _level_bytes, groups_of

    groups, fixed = groups_of(ir.load(export / "model.onnx"))
    width = 2 if target == "tensorrt" else 4  # the export is fp32
    fixed = fixed * width // 4
    levels = [_level_bytes(k, n, width) for g in groups for k, n in g.shapes]
    int4 = fixed + sum(b["int4"] for b in levels if b)
    int8 = fixed + sum(b["int8"] for b in levels if b)
    return round((int4 + MIXED_FRACTION * (int8 - int4)) / MIB, 4)


def optimize_section(c: Candidate, ctx: Context) -> OptimizeSection:
    """`kiln optimize` options for the candidate: fusions off = the target's fusions skipped."""
    from kiln.optimize import default_passes
    from kiln.optimize.ort import ORT_FUSIONS
    from kiln.optimize.passes import FUSIONS

    target, precision = ctx.target.optimize_target, c["precision"]
    names = default_passes(precision, target=target)
    fusions = [p.name for p in ORT_FUSIONS] if target == "onnxruntime" else list(FUSIONS)
    skip = () if c["fusions"] else tuple(n for n in names if n in fusions)
    added = {knob: m.passes[target] for knob, _, m in knob_methods(c) if m is not None}
    method, sparsity = added.get("method"), added.get("sparsity")
    passes: tuple[str, ...] = ()
    if method or sparsity:  # the calibrated pass takes the round-to-nearest quantizer's place
        from kiln.precisions import PRECISIONS

        rtn = {PRECISIONS[precision].quantizer, PRECISIONS[precision].ort_quantizer}
        kept = [n for n in names if n not in skip]
        passes = tuple(method if n in rtn and method else n for n in kept)
        passes = (*passes[:-2], sparsity, *passes[-2:]) if sparsity else passes
        skip = ()
    calibration = str(ctx.calibration) if needs_calibration(c) else ""
    return OptimizeSection(target, precision, skip, passes, calibration)


def make_export(model: Path, section: ExportSection, out: Path) -> Path:
    """The fp32 export of `model` with the section's KV layout."""
    from kiln.export import export_model

    return export_model(model, out, kv=section.kv, max_context=section.max_context)


def make_artifact(
    export: Path,
    section: OptimizeSection,
    out: Path,
    pass_config: dict[str, Any] | None = None,
    *,
    compressed: bool = False,
) -> dict[str, Any]:
    """Optimize `export` as the section says; the result's path and weight bytes.

    `pass_config` carries the calibration of calibrated passes (optimize/calibrate.py
    `Calibration.as_config`); optimize's own cache key includes it. A `compressed` graph
    (optimize/methods.py) is meant to move logits past the precision's tolerance, as in `kiln
    compress`: its drift is recorded, and the eval judges it.
    """
    from kiln.optimize import optimize_model

    if section.weight_budget_mib is not None:
        pass_config = {**(pass_config or {}), "weight_budget_mib": section.weight_budget_mib}
    optimize_model(
        export,
        out,
        target=section.target,
        precision=section.precision,
        passes=list(section.passes) or None,
        skip=section.skip,
        check_torch=False,  # the eval judges the graph against the fp32 export
        pass_config=pass_config,
        allow_drift=compressed,
    )
    files = sorted(p for p in out.glob("model.onnx*") if p.is_file())
    return {"path": str(out), "onnx_bytes": sum(p.stat().st_size for p in files)}


def evaluate(
    artifact: Path, reference: Path, text: Path | None, opts: EvalOptions, out: Path
) -> dict[str, Any]:
    """The eval protocol's figures for `artifact` against the fp32 `reference`."""
    from kiln.evaluate import evaluate_model

    report = evaluate_model(artifact, reference=reference, text=text, out=out, options=opts)
    r = report.results
    return {
        "kl_mean": r["kl_mean"],
        "kl_max": r["kl_max"],
        "top1_agreement": r["top1_agreement"],
        "greedy_agreement": r["greedy_agreement"],
        "perplexity": r["perplexity"],
        "reference_perplexity": r["reference_perplexity"],
        "ppl_increase": (r["perplexity"] - r["reference_perplexity"]) / r["reference_perplexity"],
        "tokens_scored": report.protocol["perplexity"]["tokens_scored"],
    }


def build(artifact: Path, ctx: Context, precision: str, out: Path) -> dict[str, Any]:
    """Build the engine of `artifact` for the target's profile at `precision`.

    Returns size, build time and what the built engine says of its precision (engine.json: a
    TensorRT-RTX plan cannot be inspected per layer without a GPU), or why it was skipped.
    """
    import importlib.util

    from kiln.engine import build_engine, read_engine

    profile = ctx.target.profile
    assert profile is not None
    gpu = replace(profile, precision=precision)
    if importlib.util.find_spec(gpu.module) is None:
        return {"status": f"skipped: needs {gpu.module} (a {gpu.backend} host)"}
    build_engine(artifact, gpu, out)
    m = read_engine(out, verify=False)
    return {
        "status": "built",
        "path": str(out),
        "plan_bytes": m.plan["bytes"],
        "build_s": m.build["elapsed_s"]["build"],
        "precision": m.precision,
        "layer_types": m.build.get("layer_types", {}),
        "layer_precisions": "engine inspector needs the target GPU; engine.json precision above",
    }
