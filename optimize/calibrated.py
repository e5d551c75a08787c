"""Calibrated int4 weight-only passes: GPTQ rounding with a clipping search (optimize/gptq.py).

The graph's constant-weight MatMuls are taken a few distinct inputs at a time (about one
decoder layer) in graph order: their input Hessians XᵀX are collected through ONNX Runtime on
the graph as it is now (earlier groups already quantized, so later layers compensate for
earlier rounding), their weights rounded, and the Hessians dropped (optimize/calibrate.py).

Outputs are those of round-to-nearest int4 (optimize/precision/weight_only.py): block
DequantizeLinear on a symmetric INT4 weight (tensorrt target), or, on the onnxruntime target,
the same blocks repacked into com.microsoft MatMulNBits (`to_matmul_nbits`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.errors import ConfigError
from kiln.optimize.base import GraphPass, count_delta, op_counts
from kiln.optimize.calibrate import Calibration, groups_in_order, hessians, peak_bytes
from kiln.optimize.gptq import gptq_int4
from kiln.optimize.precision.weight_only import _weights, quantize_weights
from kiln.optimize.typecheck import check_types
from kiln.steps import Result

_MS = "com.microsoft"
log = logging.getLogger(__name__)


def calibrated_int4(
    model: ir.Model,
    calibration: Calibration,
    *,
    block: int = 32,
    group: int = 4,
    only: set[str] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """GPTQ-round the constant MatMul weights of `model` in place (block DequantizeLinear).

    `only`: names of the weights to quantize (all when None). Returns counts (weights, bytes
    before/after, peak bytes of one group) and notes.
    """
    if not calibration.sequences:
        raise ConfigError("calibration has no sequences; pass --calibration FILE with text.")
    todo = [m for m in _weights(model.graph) if only is None or m.w.name in only]
    totals = {"weights": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0, "groups": 0}
    notes: list[str] = []
    peak = 0
    longest = max(len(s) for s in calibration.sequences)
    groups, t0 = list(groups_in_order([m.x for m in todo], group)), time.perf_counter()
    for i, values in enumerate(groups):
        h = hessians(model, calibration, values)
        names = {v.name for v in values}
        ks = [a.shape[0] for a in h.values()]
        peak = max(peak, peak_bytes(ks, longest))

        def rounding(item: Any, w_kn: np.ndarray, b: int, h: dict[str, np.ndarray] = h) -> Any:
            return gptq_int4(w_kn, h[item.x.name], block=b)

        def chosen(m: Any, names: set[str | None] = names) -> bool:
            return m.x.name in names and (only is None or m.w.name in only)

        counts, n = quantize_weights(model, bits=4, block=block, rounding=rounding, only=chosen)
        for key, v in counts.items():
            totals[key] += v
        notes += n
        totals["groups"] += 1
        log.info("GPTQ group %d/%d done (%.0f s)", i + 1, len(groups), time.perf_counter() - t0)
    totals["peak_group_bytes"] = peak
    notes.append(
        f"calibration {calibration.source}: {len(calibration.sequences)} sequences, "
        f"{calibration.tokens} tokens; peak memory per group {peak / 2**20:.1f} MiB "
        "(Hessians + one sequence's activations) on top of the model"
    )
    return totals, notes


def to_matmul_nbits(model: ir.Model, *, accuracy_level: int = 4) -> int:
    """DequantizeLinear(int4/int8 block, axis 0) -> MatMul pairs become MatMulNBits; the count.

    MatMulNBits stores B[N, K/block, block*bits/8] as unsigned q + 2^(bits-1) (its default
    zero point when none is given), low nibble first, and scales[N, K/block].
    """
    import ml_dtypes  # noqa: F401  (int4 arrays come back as ml_dtypes.int4)

    graph, done = model.graph, 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.inputs[1] is None:
            continue
        dq = node.inputs[1].producer()
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) != 2:
            continue
        qv, sv = dq.inputs[0], dq.inputs[1]
        if qv is None or sv is None or qv.const_value is None or sv.const_value is None:
            continue
        bits = {ir.DataType.INT4: 4, ir.DataType.INT8: 8}.get(qv.const_value.dtype)
        if bits is None or dq.attributes.get_int("axis", 1) != 0:
            continue
        block = dq.attributes.get_int("block_size", 0)
        q = qv.const_value.numpy().astype(np.int16)
        k, n = q.shape
        u = (q + (1 << (bits - 1))).astype(np.uint8).T.reshape(n, k // block, block)
        if bits == 4:
            u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
        scale = sv.const_value.numpy().astype(np.float32).T.copy()  # [N, K/block]
        name = qv.name or f"w{done}"
        b_val = ir.val(f"{name}_nbits", const_value=ir.tensor(u))
        s_val = ir.val(f"{name}_nbits_scale", const_value=ir.tensor(scale))
        for v in (b_val, s_val):
            graph.register_initializer(v)
        attrs = {
            "K": k,
            "N": n,
            "bits": bits,
            "block_size": block,
            "accuracy_level": accuracy_level,
        }
        mm = ir.node("MatMulNBits", [node.inputs[0], b_val, s_val], attributes=attrs, domain=_MS)
        out = node.outputs[0]
        mm.outputs[0].shape, mm.outputs[0].type = out.shape, out.type
        graph.insert_before(node, mm)
        out_name = out.name
        out.replace_all_uses_with(mm.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        mm.outputs[0].name = out_name
        if not dq.outputs[0].uses():
            graph.remove(dq, safe=True)
        done += 1
    for name in [n for n, v in graph.initializers.items() if not v.uses()]:
        del graph.initializers[name]
    if done:
        model.opset_imports.setdefault(_MS, 1)
        graph.opset_imports.setdefault(_MS, 1)
    return done


class CalibratedPass(GraphPass):
    """A pass that needs calibration token sequences: built from the pass config, refused without.

    `kiln compress` hands the calibration to optimize_model as the pass config
    (`Calibration.as_config()`); `for_model` reads it back and `requires` refuses to run without
    it, naming the command (`usage`) that supplies it.
    """

    usage = "kiln compress ARTIFACT --method METHOD --calibration FILE"

    def __init__(self, calibration: Calibration | None = None) -> None:
        self.calibration = calibration

    @classmethod
    def for_model(cls, config: Mapping[str, Any]) -> GraphPass:
        """The pass over the calibration `config` carries (none: `requires` refuses to run)."""
        return cls(Calibration.from_config(config))

    def requires(self, value: ir.Model) -> None:
        """Calibration is what this pass is about: refuse without it, naming the command."""
        if self.calibration is None:
            raise ConfigError(
                f"pass {self.name!r} needs calibration text; run `{self.usage}` (text from the "
                "model's domain, never the held-out evaluation text)."
            )


class CalibratedInt4Pass(CalibratedPass):
    """int4 weight-only with GPTQ rounding and clip search, as block DequantizeLinear."""

    name = "int4-gptq"
    quantizes = True  # judged by the target precision's tolerance (optimize/passes.py)
    usage = "kiln compress ARTIFACT --method gptq-int4 --calibration FILE"

    def __init__(
        self, calibration: Calibration | None = None, *, block: int = 32, group: int = 4
    ) -> None:
        super().__init__(calibration)
        self.block, self.group = block, group

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Quantize in place; counts as int4-weight-only's plus groups and peak group bytes."""
        assert self.calibration is not None  # requires() ran
        counts, notes = calibrated_int4(model, self.calibration, block=self.block, group=self.group)
        return Result(model, changed=counts["weights"] > 0, counts=counts, notes=notes)

    def ensures(self, model: ir.Model) -> None:
        """The result must pass strict ONNX type checking."""
        check_types(model, what=f"the graph after {self.name}")


class CalibratedMatMulNBitsPass(CalibratedInt4Pass):
    """The onnxruntime target's calibrated int4: the same blocks as MatMulNBits (CPU kernel)."""

    name = "matmul-nbits-int4-gptq"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """GPTQ blocks, then repack each DequantizeLinear -> MatMul into MatMulNBits."""
        before = op_counts(model)
        result = super().run(model)
        to_matmul_nbits(model)
        counts = {**result.counts, **count_delta(before, op_counts(model))}
        return Result(model, changed=result.changed, counts=counts, notes=result.notes)

    def ensures(self, model: ir.Model) -> None:
        """Contrib ops have no ONNX schema to type-check against: nothing to check here."""
