"""RotaryEmbedding (opset 23, TensorRT IRotaryEmbeddingLayer) from HF's rotate_half formula.

onnxscript's rule (rules.fusion._rotary_embedding) matches the fp32 export only: in fp16/bf16
exports HF casts cos/sin to the activation dtype (and may scale them, e.g. YaRN's
attention_factor), so Cast and Mul sit between Cos/Sin and the Unsqueeze. This rule accepts
both, and rewrites to RotaryEmbedding(x, cos, sin) with the half-width cos/sin tables.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchContext
from onnxscript.rewriter._context import TapeBuilder
from onnxscript.rewriter._pattern_ir import OpPatternBuilder, ValuePattern
from onnxscript.rewriter.pattern import MatchResult, OpsetPatternBuilder, Var

from kiln.optimize.fusions.base import FusionPass, has_ops


def _table(
    op: OpsetPatternBuilder, trig: OpPatternBuilder, freqs: Var, scale: Var, dtype: Var
) -> ValuePattern:
    t = trig(op.Concat(freqs, freqs, axis=-1))
    t = pattern.OrValue([op.Mul(t, scale), t])
    return pattern.OrValue([op.Cast(t, to=dtype), t])


class RotaryFusion(pattern.RewriteRuleClassBase):
    """x * cos + rotate_half(x) * sin, cos/sin = [Cast]([Mul](Cos/Sin(Concat(f, f))))."""

    def __init__(self) -> None:
        super().__init__(name="RotaryEmbedding23", remove_nodes=False)

    def pattern(
        self,
        op: OpsetPatternBuilder,
        x: Var,
        freqs: Var,
        s1: Var,
        e1: Var,
        s2: Var,
        e2: Var,
        ax1: Var,
        ax2: Var,
        cscale: Var,
        sscale: Var,
        cdt: Var,
        sdt: Var,
    ) -> ValuePattern:
        """q_embed = q * cos + rotate_half(q) * sin (HF modeling_llama)."""
        cos = op.Unsqueeze(_table(op, op.Cos, freqs, cscale, cdt), ax1)
        sin = op.Unsqueeze(_table(op, op.Sin, freqs, sscale, sdt), ax2)
        x1 = op.Slice(x, s1, e1, [3], [1])
        x2 = op.Slice(x, s2, e2, [3], [1])
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        embedded: ValuePattern = x * cos + rotated * sin
        return embedded

    def check(
        self,
        op: MatchContext,
        x: ir.Value,
        s1: ir.Value,
        e1: ir.Value,
        s2: ir.Value,
        e2: ir.Value,
        ax1: ir.Value,
        ax2: ir.Value,
        **_: Any,
    ) -> MatchResult:
        """4-D x with static heads and head size, split in equal halves, tables unsqueezed at 1."""
        result = MatchResult()
        if not (_ir_utils.is_singleton_value(ax1, 1) and _ir_utils.is_singleton_value(ax2, 1)):
            return result.fail("cos/sin are not unsqueezed at axis 1 (BHSD layout)")
        if x is None or x.shape is None or len(x.shape) != 4:
            return result.fail("x is not known to be 4-D", x)
        heads, head = x.shape[1], x.shape[3]
        if not isinstance(heads, int) or not isinstance(head, int):
            return result.fail("x has dynamic heads or head size", x)
        half = head // 2
        if not (
            _ir_utils.is_singleton_value(s1, 0)
            and _ir_utils.is_singleton_value(e1, half)
            and _ir_utils.is_singleton_value(s2, half)
            and _ir_utils.is_singleton_value(e2, lambda v: v >= head)
        ):
            return result.fail("x is not split into two halves of head_size/2 (partial rotary?)")
        return result

    def rewrite(
        self,
        op: TapeBuilder,
        x: ir.Value,
        freqs: ir.Value,
        cscale: ir.Value | None,
        sscale: ir.Value | None,
        **_: Any,
    ) -> ir.Value:
        """RotaryEmbedding(x, cos[B,S,D/2], sin[B,S,D/2]) in x's dtype."""
        cos, sin = op.Cos(freqs), op.Sin(freqs)
        if cscale is not None:
            cos = op.Mul(cos, cscale)
        if sscale is not None:
            sin = op.Mul(sin, sscale)
        if x.dtype != freqs.dtype:  # tables are computed in fp32; the op wants x's dtype
            cos, sin = op.Cast(cos, to=x.dtype), op.Cast(sin, to=x.dtype)
        embedded: ir.Value = op.RotaryEmbedding(x, cos, sin, interleaved=0)
        return embedded


ROTARY_RULES = pattern.RewriteRuleSet([RotaryFusion.rule()])


class RotaryEmbeddingFusionPass(FusionPass):
    """HF rotate_half RoPE on q and k -> RotaryEmbedding (opset 23)."""

    name = "rotary-embedding"
    produces = "RotaryEmbedding"
    opset = 23

    def rules(self, model: ir.Model) -> pattern.RewriteRuleSet:
        """Return the rotary rule."""
        return ROTARY_RULES

    def expected(self, model: ir.Model) -> str | None:
        """RoPE leaves Cos, Sin and Neg behind."""
        if has_ops(model, "Cos", "Sin", "Neg"):
            return "the graph has Cos, Sin and Neg (RoPE)"
        return None
