"""2:4 structured sparsity: in every 4 consecutive weights along the input axis K, keep 2.

That is the pattern Ampere+ sparse tensor cores run (TensorRT's SPARSE_WEIGHTS builder flag,
`[builder] sparse_weights = true` in a GPU profile; engine.json records the build log's
sparsity lines). The weights stay float in the graph, zeros in place, so every runtime runs the
result; no CPU kernel runs it faster, and its GPU speed is not measured here.

Which two to keep: the largest |w| (magnitude), or, calibrated, the largest |w_kn| * ||x_k||
(Wanda, Sun et al. 2023): a weight whose input channel is loud matters more. The LM head is
left dense (its error lands on every logit).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from kiln.optimize.base import GraphPass
from kiln.optimize.calibrate import Calibration, hessians
from kiln.optimize.calibrated import CalibratedPass
from kiln.optimize.precision.weight_only import _weights
from kiln.steps import Result


def mask_2of4(score_kn: np.ndarray) -> np.ndarray:
    """Boolean keep-mask [K, N]: the 2 highest scores of every 4 rows along K, per column."""
    k, n = score_kn.shape
    if k % 4:
        raise ValueError(f"K={k} is not a multiple of 4")
    groups = score_kn.reshape(k // 4, 4, n)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :2, :], True, axis=1)
    return keep.reshape(k, n)


def is_2of4(w_kn: np.ndarray) -> bool:
    """Whether at most 2 of every 4 consecutive weights along K are non-zero."""
    k, n = w_kn.shape
    return k % 4 == 0 and bool(((w_kn.reshape(k // 4, 4, n) != 0).sum(axis=1) <= 2).all())


def _head(model: ir.Model) -> set[str]:
    """Weights of MatMuls whose output is a graph output (the LM head)."""
    outputs = set(model.graph.outputs)
    return {m.w.name for m in _weights(model.graph) if m.node.outputs[0] in outputs and m.w.name}


def sparsify_2of4(
    model: ir.Model, calibration: Calibration | None = None, *, skip_head: bool = True
) -> dict[str, int]:
    """Make every constant MatMul weight 2:4 along K in place; counts weights and zeros.

    With `calibration`, scores are |w| * sqrt(diag XᵀX) (input channel norms through ONNX
    Runtime, one MatMul input at a time), else |w|.
    """
    head = _head(model) if skip_head else set()
    counts = {"weights": 0, "skipped": 0, "zeros": 0, "params": 0}
    for m in _weights(model.graph):
        if m.w.name in head or m.w.const_value is None:
            continue
        w = m.w.const_value.numpy()
        if w.shape[0] % 4:
            counts["skipped"] += 1
            continue
        score = np.abs(w.astype(np.float32))
        if calibration is not None:
            h = hessians(model, calibration, [m.x])[m.x.name or ""]
            score = score * np.sqrt(np.diag(h))[:, None].astype(np.float32)
        pruned = np.where(mask_2of4(score), w, np.zeros((), w.dtype))
        m.w.const_value = ir.tensor(pruned, name=m.w.name)
        counts["weights"] += 1
        counts["zeros"] += int((pruned == 0).sum())
        counts["params"] += int(pruned.size)
    return counts


class Sparse24Pass(GraphPass):
    """2:4 sparsity by weight magnitude (no calibration)."""

    name = "sparse-2of4"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Zero 2 of every 4 weights along K in every MatMul but the head."""
        counts = sparsify_2of4(model)
        return Result(model, changed=counts["weights"] > 0, counts=counts)


class CalibratedSparse24Pass(CalibratedPass):
    """2:4 sparsity by |w| times the input channel's activation norm (Wanda).

    Without calibration this would be the magnitude pass ('sparse-2of4'): `requires` refuses.
    """

    name = "sparse-2of4-calibrated"
    usage = "kiln compress ARTIFACT --method sparse24-calibrated --calibration FILE"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Zero 2 of every 4 weights along K, scored by |w| * ||x_k||."""
        counts = sparsify_2of4(model, self.calibration)
        return Result(model, changed=counts["weights"] > 0, counts=counts)
