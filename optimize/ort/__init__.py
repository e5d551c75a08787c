"""The onnxruntime (CPU) target: ONNX Runtime contrib-op fusions and MatMulNBits weights.

Pass order: kiln's cleanup, then RMS/skip norms (onnxscript ort_fusions), RoPE onto
RotaryEmbedding with a cos/sin cache, attention onto GroupQueryAttention, QKV and gate/up
projection packing (static layout: RoPE folded into GQA), the weight-only precision
(MatMulNBits, after untying a tied LM head), and a final cleanup.
"""

from __future__ import annotations

__all__ = ["ORT_PRECISIONS", "ort_pass_names"]

# CPU kernels: fp32 activations; int8/int4 are weight-only MatMulNBits over fp32 activations.
ORT_PRECISIONS = ("fp32", "int8", "int4")
ORT_FUSIONS = (
    "ort-norms",
    "gelu",
    "ort-rotary",
    "ort-gqa",
    "ort-pack",
)  # gelu: kiln's ONNX Gelu-20 rule
ORT_QUANT = {"int8": "matmul-nbits-int8", "int4": "matmul-nbits-int4"}


def ort_pass_names(precision: str) -> list[str]:
    """The default pass names of the onnxruntime target for `precision`, in order."""
    from kiln.optimize.passes import CLEANUP

    names = [*CLEANUP, *ORT_FUSIONS]
    if precision in ORT_QUANT:  # a tied head must be its own initializer to be quantized
        names += ["ort-untie-head", ORT_QUANT[precision]]
    return [*names, "cse", "remove-unused"]
