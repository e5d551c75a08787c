"""The onnxruntime target's graph passes: onnxscript ort_fusions and kiln's own rules as Steps."""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from kiln.optimize.base import GraphPass, count_delta, op_counts
from kiln.optimize.fusions.base import closest_miss
from kiln.steps import Result

# ORT's SimplifiedLayerNormalization sits in the default domain without an ONNX schema; the
# unused-node pass logs a stack trace at INFO for each one. Nothing is wrong: keep it quiet.
logging.getLogger("onnx_ir.passes.common.unused_removal").setLevel(logging.WARNING)


def _ms_opset(model: ir.Model) -> None:
    model.opset_imports.setdefault("com.microsoft", 1)
    model.graph.opset_imports.setdefault("com.microsoft", 1)


class OrtNormsPass(GraphPass):
    """RMSNorm -> SimplifiedLayerNormalization, residual Add + norm -> Skip*Normalization.

    onnxscript's ort_fusions rules (rms_normalization, skip_normalization) do the matching.
    """

    name = "ort-norms"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Apply the library's norm fusions in place; count by produced op."""
        from onnxscript import optimizer
        from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
        from onnxscript.rewriter.ort_fusions.skip_normalization import (
            fuse_skip_layer_normalization,
            fuse_skip_rms_normalization,
        )

        before = op_counts(model)
        common_passes.ShapeInferencePass()(model)
        optimizer.optimize(model)  # constant-folds shapes the rules' checks need
        fuse_rms_normalization(model)
        fuse_skip_rms_normalization(model)
        fuse_skip_layer_normalization(model)
        optimizer.optimize(model)  # inlines what the fusions left as functions
        _ms_opset(model)
        delta = count_delta(before, op_counts(model))
        return Result(model, changed=bool(delta), counts=delta)


class _RulePass(GraphPass):
    """Apply one hand-written onnxscript rule set; count rewrites, say why nothing matched."""

    produces: str = ""

    def rules(self) -> Any:
        """The RewriteRuleSet."""
        raise NotImplementedError

    def expected(self, model: ir.Model) -> bool:
        """Whether a match is expected in this graph (then a miss is explained in the notes)."""
        return False

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Apply the rules, then shape-infer the rewritten values."""
        common_passes.ShapeInferencePass()(model)
        rules = self.rules()
        count = rules.apply_to_model(model)
        notes = []
        if count:
            _ms_opset(model)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.ShapeInferencePass()(model)
        elif self.expected(model):
            notes.append(f"no {self.produces} fusion: {closest_miss(self.rules(), model)}")
        return Result(model, changed=count > 0, counts={self.produces: count}, notes=notes)


class OrtRotaryPass(_RulePass):
    """RoPE with constant frequencies -> com.microsoft RotaryEmbedding (rotary.py)."""

    name = "ort-rotary"
    produces = "RotaryEmbedding"

    def __init__(self, max_positions: int) -> None:
        self.max_positions = max_positions

    def rules(self) -> Any:  # noqa: D102
        from onnxscript.rewriter import pattern

        from kiln.optimize.ort.rotary import RotaryCacheRule

        return pattern.RewriteRuleSet([RotaryCacheRule.rule(self.max_positions)])

    def expected(self, model: ir.Model) -> bool:  # noqa: D102
        return any(n.op_type == "Cos" for n in model.graph)


class OrtGqaPass(_RulePass):
    """Attention over the KV cache -> com.microsoft GroupQueryAttention (gqa.py)."""

    name = "ort-gqa"
    produces = "GroupQueryAttention"

    def __init__(self, sliding_window: int | None) -> None:
        self.sliding_window = sliding_window

    def rules(self) -> Any:  # noqa: D102
        from onnxscript.rewriter import pattern

        from kiln.optimize.ort.gqa import ConcatGqaRule, StaticGqaRule

        return pattern.RewriteRuleSet([ConcatGqaRule.rule(), StaticGqaRule.rule()])

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Refuse sliding-window graphs (GQA's local_window_size is not mapped); else fuse."""
        if self.sliding_window:
            note = (
                f"sliding window {self.sliding_window}: attention left unfused (the mask is not "
                "plain causal; GroupQueryAttention local_window_size is not mapped)"
            )
            return Result(model, changed=False, counts={self.produces: 0}, notes=[note])
        return super().run(model)

    def expected(self, model: ir.Model) -> bool:  # noqa: D102
        return any(n.op_type in ("Softmax", "Attention") for n in model.graph)
