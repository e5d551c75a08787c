"""LayerNormalization (opset 17, TensorRT INormalizationLayer) from a mean/variance chain.

The dynamo exporter already emits LayerNormalization for torch's layer_norm (GPT-2), so this
mostly reports those; onnxscript's rule catches hand-written LayerNorms (fp32 compute only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from kiln.optimize.fusions.base import FusionPass, has_ops

if TYPE_CHECKING:
    from onnxscript.rewriter.pattern import RewriteRuleSet


class LayerNormFusionPass(FusionPass):
    """(x - mean) / sqrt(var + eps) * w (+ b) -> LayerNormalization(x, w, b)."""

    name = "layer-norm"
    produces = "LayerNormalization"
    opset = 18

    def rules(self, model: ir.Model) -> RewriteRuleSet:
        """Return onnxscript's LayerNormalization rules (with and without bias)."""
        from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_ruleset

        return layer_normalization_ruleset

    def expected(self, model: ir.Model) -> str | None:
        """A LayerNorm by hand leaves ReduceMean + Sub + Sqrt behind."""
        if has_ops(model, "ReduceMean", "Sub", "Sqrt"):
            return "the graph has ReduceMean, Sub and Sqrt"
        return None
