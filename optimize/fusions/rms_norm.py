"""RMSNormalization (opset 23) from the exporter's Pow/ReduceMean/Sqrt/Reciprocal/Mul chain.

onnxscript's rule (onnxscript.rewriter.rules.fusion._rms_normalization) matches the fp32
pattern and the fp16/bf16 one with HF's Cast-to-fp32 upcast, keeping fp32 statistics via
stash_type. TensorRT-RTX decomposes the op again (no INormalizationLayer for RMS), so the win
is a smaller graph and fp32 statistics that survive precision passes, not a fused kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from kiln.optimize.fusions.base import FusionPass, has_ops

if TYPE_CHECKING:
    from onnxscript.rewriter.pattern import RewriteRuleSet


class RmsNormFusionPass(FusionPass):
    """x * rsqrt(mean(x^2) + eps) * w -> RMSNormalization(x, w)."""

    name = "rms-norm"
    produces = "RMSNormalization"
    opset = 23

    def rules(self, model: ir.Model) -> RewriteRuleSet:
        """Return onnxscript's RMSNormalization rules."""
        from onnxscript.rewriter.rules.fusion._rms_normalization import rms_normalization_ruleset

        return rms_normalization_ruleset

    def expected(self, model: ir.Model) -> str | None:
        """RMS norms leave Pow + ReduceMean + Reciprocal behind."""
        if has_ops(model, "Pow", "ReduceMean", "Reciprocal"):
            return "the graph has Pow, ReduceMean and Reciprocal"
        return None
