"""The onnxruntime target's graph passes: onnxscript ort_fusions and kiln's own rules as Steps."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from kiln.optimize.base import GraphPass, count_delta, op_counts
from kiln.optimize.fusions.base import closest_miss
from kiln.steps import Result

if TYPE_CHECKING:
    from onnxscript.rewriter.pattern import RewriteRuleSet

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

    def rules(self) -> RewriteRuleSet:
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

    @classmethod
    def for_model(cls, config: Mapping[str, Any]) -> OrtRotaryPass:
        """The cos/sin cache spans the model's positions (4096 when the config has none)."""
        return cls(int(config.get("max_positions") or 4096))

    def rules(self) -> RewriteRuleSet:  # noqa: D102
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

    @classmethod
    def for_model(cls, config: Mapping[str, Any]) -> OrtGqaPass:
        """A sliding-window model is refused at run time (see run)."""
        return cls(config.get("sliding_window"))

    def rules(self) -> RewriteRuleSet:  # noqa: D102
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


class UntieHeadPass(GraphPass):
    """MatMul(x, Transpose(W)) of a tied LM head -> MatMul(x, W^T as its own initializer).

    MatMulNBits needs the weight as an initializer; a tied head reads the embedding table
    through a Transpose, so without this the head (V x E, the largest matrix) stays fp32.
    The Gather keeps the fp32 table: it reads one row per token, the head reads all of it.
    """

    name = "ort-untie-head"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Give each transposed constant MatMul weight a transposed initializer of its own."""
        import numpy as np

        count = 0
        for node in list(model.graph):
            if node.op_type != "MatMul" or node.inputs[1] is None:
                continue
            t = node.inputs[1].producer()
            if t is None or t.op_type != "Transpose" or t.inputs[0] is None:
                continue
            w = t.inputs[0]
            perm = t.attributes.get("perm")
            if w.const_value is None or len(w.shape or ()) != 2:
                continue
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                continue
            arr = np.ascontiguousarray(w.const_value.numpy().T)
            head = ir.val(f"{w.name}_T", const_value=ir.tensor(arr))
            model.graph.register_initializer(head)
            node.replace_input_with(1, head)
            count += 1
        if count:
            common_passes.RemoveUnusedNodesPass()(model)
        return Result(model, changed=count > 0, counts={"untied_heads": count})


class OrtPackPass(GraphPass):
    """Q/K/V and gate/up MatMuls -> one packed MatMul + Split; static GQA takes RoPE (pack.py)."""

    name = "ort-pack"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Pack sibling projections, then fold RoPE into GroupQueryAttention where exact."""
        from kiln.optimize.ort.pack import fold_rotary_into_gqa, pack_sibling_matmuls

        packed = pack_sibling_matmuls(model)
        folded = fold_rotary_into_gqa(model)
        if packed or folded:
            _ms_opset(model)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.ShapeInferencePass()(model)
        counts = {"packed_matmuls": packed, "gqa_do_rotary": folded}
        return Result(model, changed=bool(packed or folded), counts=counts)
