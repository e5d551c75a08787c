"""Named rules that drop a candidate before anything is built or measured.

Each rule reads kiln's own records (kiln/precisions.py for precisions and compute capability,
optimize/methods.py METHODS and optimize/passes.py PASSES for what can be made, the GPU
profile for shapes) rather than
repeating their facts, and says why in words. `first_violation` gives the first rule a
candidate breaks, in RULES order; tune.json records its id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kiln.errors import ConfigError
from kiln.precisions import PRECISIONS, precision_named
from kiln.tune.space import (
    CHANNEL_GROUP,
    Candidate,
    Context,
    knob_methods,
    needs_calibration,
    prune_spec,
    pruned_shape,
    prunes,
)


@dataclass(frozen=True)
class Rule:
    """`check` returns why the candidate is hopeless on this target, or None."""

    id: str
    check: Callable[[Candidate, Context], str | None]


def _offered(c: Candidate, ctx: Context) -> str | None:
    try:
        precision_named(c["precision"], target=ctx.target.optimize_target)
    except ConfigError as e:
        return str(e)
    return None


def _compute_capability(c: Candidate, ctx: Context) -> str | None:
    profile = ctx.target.profile
    if profile is None:
        return None
    p = PRECISIONS[c["precision"]]
    low = [cc for cc in profile.compute_capabilities if float(cc) < p.min_compute_capability]
    if low:
        return (
            f"{p.name} needs compute capability >= {p.min_compute_capability} ({p.sm}), but "
            f"profile {profile.name} targets {', '.join(low)}"
        )
    return None


def _method_needs_weights(c: Candidate, ctx: Context) -> str | None:
    p = PRECISIONS[c["precision"]]
    if c["method"] != "rtn" and not any(k.startswith("weights int") for k in p.quantized):
        return f"{c['method']} calibrates integer weight quantization; {p.name} has none"
    return None


def _method_precision(c: Candidate, ctx: Context) -> str | None:
    for knob, key, m in knob_methods(c):
        if m is not None and m.replaces and m.precision != c["precision"]:
            return (
                f"{knob} {c[knob]!r} is optimize/methods.py method {key}, which makes "
                f"{m.precision} only, not {c['precision']}"
            )
    return None


def _pass_missing(c: Candidate, ctx: Context) -> str | None:
    from kiln.optimize.passes import PASSES

    target = ctx.target.optimize_target
    why = []
    for knob, key, m in knob_methods(c):
        if m is None:
            why.append(f"{knob} {c[knob]!r}: no method {key!r} in optimize/methods.py METHODS")
        elif m.passes.get(target) not in PASSES:
            why.append(
                f"{knob} {c[knob]!r}: method {key} has no {target} pass in optimize/passes.py "
                f"PASSES ({m.passes.get(target)!r})"
            )
    return "not available: " + "; ".join(why) if why else None


def _needs_text(c: Candidate, ctx: Context) -> str | None:
    if ctx.calibration is None and (needs_calibration(c) or prunes(c)):
        return (
            f"method {c['method']} / sparsity {c['sparsity']} / prune {c['prune']} calibrates "
            "on text and none was "
            "given: pass `kiln tune --calibration FILE` (the model's training text, never the "
            "held-out eval text)"
        )
    return None


def _sparse_float(c: Candidate, ctx: Context) -> str | None:
    p = PRECISIONS[c["precision"]]
    if c["sparsity"] != "dense" and any(k.startswith("weights") for k in p.quantized):
        return (
            f"2:4 zeroes float weights (optimize/sparsity.py); {p.name} has already quantized "
            "them when the sparsity pass runs"
        )
    return None


def _sparse_target(c: Candidate, ctx: Context) -> str | None:
    if c["sparsity"] == "dense":
        return None
    if ctx.target.is_cpu:
        return (
            "ONNX Runtime CPU has no 2:4 sparse kernels: the zeros would cost accuracy for no speed"
        )
    low = [cc for cc in ctx.target.profile.compute_capabilities if float(cc) < 8.0]  # type: ignore[union-attr]
    if low:
        return f"2:4 sparse tensor cores start at SM80; the profile targets {', '.join(low)}"
    return None


# TensorRT's sparse tactics pay off only with large channels (NVIDIA in TensorRT issue 4065:
# "256 or above"); below, TensorRT picks dense tactics anyway.
SPARSE_MIN_CHANNELS = 256


def _sparse_size(c: Candidate, ctx: Context) -> str | None:
    small = min(ctx.shape.hidden, ctx.shape.intermediate)
    if c["sparsity"] != "dense" and small < SPARSE_MIN_CHANNELS:
        return f"GEMM dimension {small} < {SPARSE_MIN_CHANNELS}: TensorRT keeps dense tactics"
    return None


# The layouts compress/prune.py cuts (its `_decoder`: model.layers[i].mlp.gate_proj and
# self_attn.q/k/v/o_proj), by config.json model_type.
PRUNE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _prune_family(c: Candidate, ctx: Context) -> str | None:
    if prunes(c) and ctx.shape.family not in PRUNE_FAMILIES:
        return (
            f"compress/prune.py cuts Llama-family decoders ({', '.join(PRUNE_FAMILIES)}); "
            f"this model is {ctx.shape.family or 'of unknown model_type'}"
        )
    return None


def _prune_groups(c: Candidate, ctx: Context) -> str | None:
    """A cut must leave whole channel groups, a layer and a KV group."""
    if not prunes(c):
        return None
    try:
        prune_spec(c["prune"]).check()
    except ConfigError as e:
        return str(e)
    before, after = ctx.shape, pruned_shape(ctx.shape, c["prune"])
    if after.intermediate < CHANNEL_GROUP or after.intermediate % CHANNEL_GROUP:
        return (
            f"prune {c['prune']} keeps {after.intermediate} of {before.intermediate} MLP channels: "
            f"not a whole number (>= 1) of {CHANNEL_GROUP}-channel groups, the smallest block "
            "the weight quantizers cut (optimize/precision/weight_only.py pick_block)"
        )
    if after.layers < 1 or after.kv_heads < 1:
        return f"prune {c['prune']} leaves {after.layers} layers and {after.kv_heads} KV groups"
    return None


# Cost bounds of the default space (tune/README.md): pruning and mixed precision are searched
# where they would ship. Pruning on the fused, dense graphs of the best rounding per width
# (int8 round-to-nearest; int4 by gptq: int4 rtn alone misses the default KL budget on the eval
# model, tune/README.md), mixed on fused graphs; both at the layout the target serves with.
PRUNE_ON = (("int8", "rtn"), ("int4", "gptq"))


def serving_kv(ctx: Context) -> str:
    """The KV layout the target serves with: `kiln serve`'s static slots (cpu), engines' concat."""
    return "static" if ctx.target.is_cpu else "concat"


def _prune_scope(c: Candidate, ctx: Context) -> str | None:
    if not prunes(c):
        return None
    pair = (c["precision"], c["method"])
    if (
        pair in PRUNE_ON
        and c["sparsity"] == "dense"
        and c["fusions"]
        and c["kv"] == serving_kv(ctx)
    ):
        return None
    return (
        f"pruning is searched only on fused, dense {' / '.join(' '.join(p) for p in PRUNE_ON)} "
        f"graphs at the {serving_kv(ctx)} KV layout {ctx.target.name} serves with (bounds the "
        "space's cost: each pruned graph is a new prune, export, optimize and eval)"
    )


def _mixed_scope(c: Candidate, ctx: Context) -> str | None:
    if c["method"] == "mixed" and not (c["fusions"] and c["kv"] == serving_kv(ctx)):
        return (
            f"mixed precision is searched on fused graphs at the {serving_kv(ctx)} KV layout "
            f"{ctx.target.name} serves with only (bounds the space's cost)"
        )
    return None


def _weight_blocks(c: Candidate, ctx: Context) -> str | None:
    """TensorRT-target weight-only passes need K divisible by a block (DequantizeLinear opset 21).

    ONNX Runtime's MatMulNBits pads K, so the cpu target has no such limit.
    """
    from kiln.optimize.passes import PASSES
    from kiln.optimize.precision.weight_only import pick_block

    quantizer = PRECISIONS[c["precision"]].quantizer
    if ctx.target.is_cpu or quantizer is None:
        return None
    block = getattr(PASSES[quantizer].for_model({}), "block", None)
    if block is None:
        return None
    shape = pruned_shape(ctx.shape, c["prune"])
    odd = [k for k in (shape.hidden, shape.intermediate) if pick_block(k, block) is None]
    if odd:
        return (
            f"{quantizer} quantizes in blocks along K (optimize/precision/weight_only.py "
            f"pick_block, preferred {block}); in-features {odd} fit no block, so those weights "
            "would stay float"
        )
    return None


# modelopt's H200 benchmark (Llama3.1-8B): INT4 AWQ decodes 1.33x fp16 at batch 1 but 0.75x at
# batch 8 and 0.83x at 64: the dequantization cost outgrows the bytes saved.
INT4_MAX_BATCH = 8


def _int4_batch(c: Candidate, ctx: Context) -> str | None:
    if ctx.target.is_cpu or c["precision"] != "int4" or c["slots"] < INT4_MAX_BATCH:
        return None
    return (
        f"int4 weight-only at {c['slots']} slots: measured slower than fp16 from batch "
        f"{INT4_MAX_BATCH} on GPUs; kept only by `kiln tune --measure`"
    )


def _slots_fit(c: Candidate, ctx: Context) -> str | None:
    profile = ctx.target.profile
    if profile is None:
        return None
    most = max(s.max_batch for s in profile.shapes)
    if c["slots"] > most:
        return f"{c['slots']} slots > the profile's max_batch {most}"
    return None


def _threads_fit(c: Candidate, ctx: Context) -> str | None:
    if ctx.target.is_cpu and c["threads"] > ctx.target.cores:
        return f"{c['threads']} threads > the {ctx.target.cores} cores this process may use"
    if not ctx.target.is_cpu and c["threads"]:
        return "threads are an ONNX Runtime CPU setting; GPU candidates leave them at 0"
    return None


def _context_fits(c: Candidate, ctx: Context) -> str | None:
    need, have = ctx.workload.context, ctx.shape.max_positions
    if have and need > have:
        return f"the workload needs {need} positions; the model has {have}"
    return None


RULES: tuple[Rule, ...] = (
    Rule("precision-not-offered", _offered),
    Rule("compute-capability", _compute_capability),
    Rule("method-needs-int-weights", _method_needs_weights),
    Rule("method-precision", _method_precision),
    Rule("sparsity-target", _sparse_target),
    Rule("sparsity-gemm-size", _sparse_size),
    Rule("sparsity-float-weights", _sparse_float),
    Rule("pass-not-available", _pass_missing),
    Rule("needs-calibration", _needs_text),
    Rule("prune-family", _prune_family),
    Rule("prune-channel-group", _prune_groups),
    Rule("prune-scope", _prune_scope),
    Rule("mixed-scope", _mixed_scope),
    Rule("weight-blocks", _weight_blocks),
    Rule("int4-large-batch", _int4_batch),
    Rule("slots-exceed-profile", _slots_fit),
    Rule("threads", _threads_fit),
    Rule("context", _context_fits),
)


def first_violation(c: Candidate, ctx: Context) -> tuple[str, str] | None:
    """(rule id, why) of the first rule `c` breaks, or None when it may be measured."""
    for rule in RULES:
        why = rule.check(c, ctx)
        if why is not None:
            return rule.id, why
    return None
