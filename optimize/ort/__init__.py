"""The onnxruntime (CPU) target: ONNX Runtime contrib-op fusions and MatMulNBits weights.

Pass order: kiln's cleanup, then RMS/skip norms (onnxscript ort_fusions), RoPE onto
RotaryEmbedding with a cos/sin cache, attention onto GroupQueryAttention, QKV and gate/up
projection packing (static layout: RoPE folded into GQA), the weight-only precision
(MatMulNBits, after untying a tied LM head), and a final cleanup. Which precisions the target
offers, and each one's quantizer, is on the records in kiln/precisions.py.
"""

from __future__ import annotations

from kiln.optimize.base import GraphPass
from kiln.optimize.cleanup import CLEANUP_PASSES, CsePass, RemoveUnusedPass
from kiln.optimize.fusions.gelu import GeluFusionPass
from kiln.optimize.ort.passes import (
    OrtGqaPass,
    OrtNormsPass,
    OrtPackPass,
    OrtRotaryPass,
    UntieHeadPass,
)
from kiln.precisions import PRECISIONS

__all__ = ["ORT_FUSIONS", "ort_pass_names"]

# The target's fusions in the order they run; gelu is kiln's ONNX Gelu-20 rule.
ORT_FUSIONS: tuple[type[GraphPass], ...] = (
    OrtNormsPass,
    GeluFusionPass,
    OrtRotaryPass,
    OrtGqaPass,
    OrtPackPass,
)


def ort_pass_names(precision: str) -> list[str]:
    """The default pass names of the onnxruntime target for `precision`, in order."""
    names = [p.name for p in (*CLEANUP_PASSES, *ORT_FUSIONS)]
    quantizer = PRECISIONS[precision].ort_quantizer
    if quantizer:  # a tied head must be its own initializer to be quantized
        names += [UntieHeadPass.name, quantizer]
    return [*names, CsePass.name, RemoveUnusedPass.name]
