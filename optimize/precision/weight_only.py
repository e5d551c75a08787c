"""Block-wise weight-only quantization: constant MatMul weights become DequantizeLinear(q, s).

Symmetric, no zero point (TensorRT requires zero points of 0), blocks along the input axis K of
W[K,N] (axis 0, opset 21 `block_size`), scale s[K/block, N] in the activation dtype, so the
DequantizeLinear output feeds the MatMul in the graph's own precision. No calibration: the
scale of a block is max|W| over the block / qmax. TensorRT maps DequantizeLinear on a constant
into a weight-only GEMM; ONNX Runtime CPU runs it as written, which is how drift is measured.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import onnx_ir as ir
from numpy.typing import DTypeLike

from kiln.optimize.base import set_opset

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
_BITS = {8: (ir.DataType.INT8, 127), 4: (ir.DataType.INT4, 7)}


class _Weighted(NamedTuple):
    """A MatMul/Gemm `node` computing x @ w, with w a constant 2-D float weight."""

    node: ir.Node
    x: ir.Value
    w: ir.Value
    data: ir.TensorProtocol  # w's constant value


def _weights(graph: ir.Graph) -> list[_Weighted]:
    """MatMul/Gemm nodes with a constant 2-D weight input; Gemm only without transB."""
    found = []
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        data = w.const_value if w is not None else None
        if x is None or w is None or data is None:
            continue
        if w.dtype not in FLOATS or len(w.shape or ()) != 2:
            continue
        trans_b = node.attributes.get("transB")
        if node.op_type == "Gemm" and trans_b is not None and trans_b.as_int():
            continue
        found.append(_Weighted(node, x, w, data))
    return found


def pick_block(k: int, preferred: int) -> int | None:
    """The largest of preferred, 128, 64, 32 that divides K, or None."""
    for b in (preferred, 128, 64, 32):
        if b <= k and k % b == 0:
            return b
    return None


def quantize_block(w_kn: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-block quantization along K: (q[K,N] int8 values, scale[K/block, N] fp32)."""
    qmax = _BITS[bits][1]
    k, n = w_kn.shape
    blocks = w_kn.astype(np.float32).reshape(k // block, block, n)
    scale = np.abs(blocks).max(axis=1) / qmax
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax - 1, qmax).astype(np.int8)
    return q.reshape(k, n), scale


# How a weight is rounded: (its MatMul, W[K, N] float32, block) -> (q[K, N], scale[K/block, N]).
Rounding = Callable[[_Weighted, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


def quantize_weights(
    model: ir.Model,
    *,
    bits: int,
    block: int,
    rounding: Rounding | None = None,
    only: Callable[[_Weighted], bool] | None = None,
) -> tuple[dict[str, int], list[str]]:
    """Replace each constant MatMul weight by DequantizeLinear; return counts and notes.

    `rounding` replaces round-to-nearest (calibrated passes, optimize/calibrated.py); `only`
    limits the call to some MatMuls (those whose inputs were just calibrated).
    """
    import ml_dtypes

    graph = model.graph
    qtype, _ = _BITS[bits]
    counts = {"weights": 0, "skipped": 0, "bytes_before": 0, "bytes_after": 0}
    notes: list[str] = []
    done: dict[ir.Value, ir.Value] = {}
    for item in _weights(graph):
        node, _, w, data = item
        if only is not None and not only(item):
            continue
        if w not in done:
            k, n = data.shape.numpy()
            b = pick_block(k, block)
            if b is None:
                counts["skipped"] += 1
                notes.append(f"{w.name} [{k},{n}]: K not divisible by 32; left unquantized")
                continue
            if rounding is None:
                q, scale = quantize_block(data.numpy(), bits, b)
            else:
                q, scale = rounding(item, data.numpy().astype(np.float32), b)
            np_scale: dict[ir.DataType, DTypeLike] = {
                ir.DataType.FLOAT16: np.float16,
                ir.DataType.BFLOAT16: ml_dtypes.bfloat16,
            }
            scale = scale.astype(np_scale.get(data.dtype, np.float32))
            q_arr = q.astype(ml_dtypes.int4) if bits == 4 else q
            qv = ir.val(f"{w.name}_q{bits}", const_value=ir.tensor(q_arr, dtype=qtype))
            sv = ir.val(f"{w.name}_scale", const_value=ir.tensor(scale))
            for v in (qv, sv):
                graph.register_initializer(v)
            dq = ir.node("DequantizeLinear", [qv, sv], attributes={"axis": 0, "block_size": b})
            dq.outputs[0].name = f"{w.name}_dq"
            dq.outputs[0].shape, dq.outputs[0].type = w.shape, w.type
            graph.insert_before(node, dq)
            done[w] = dq.outputs[0]
            counts["weights"] += 1
            counts["bytes_before"] += data.nbytes
            counts["bytes_after"] += q.size * bits // 8 + scale.nbytes
        node.replace_input_with(1, done[w])
    for w in done:
        if not w.uses() and w.name is not None and w.name in graph.initializers:
            del graph.initializers[w.name]
    if done:
        set_opset(model, 21)  # DequantizeLinear block_size and int4: opset 21
    return counts, notes
