"""Attention (opset 23, TensorRT IAttention) from the exporter's lowered sdpa, GQA kept native.

The dynamo exporter lowers torch's scaled_dot_product_attention at opset 18 to
  MatMul(q*sqrt(s), K^T*sqrt(s)) + Where(mask, 0, min) -> Softmax -> Where(IsNaN, 0) -> MatMul(V)
with K^T built by Reshape/Transpose/Reshape and, for GQA, K and V repeated per query head by
Unsqueeze/Expand/Reshape (HF repeat_kv). This rule replaces all of it with one
  Attention(q[B,H,S,D], present_key[B,Hkv,T,D], present_value[B,Hkv,T,D], mask[B,1,S,T], scale=s)
so the KV repeat disappears (opset-23 Attention broadcasts KV heads) while the KV Concat with the
past stays outside the op: TensorRT rejects Attention nodes with past/present
(docs/tensorrt-rtx/README.md).

Fully masked query rows (left padding): the exporter's fill is finfo.min, not -inf, so Softmax
gives a uniform row rather than NaN, and the Where(IsNaN) guard the rule drops never fires.
fp32 Attention fails to build in TensorRT-RTX ("no dedicated kernel") unless the engine stage
sets IAttention.decomposable; kiln fuses it only for low-precision activations by default.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchContext
from onnxscript.rewriter._context import TapeBuilder
from onnxscript.rewriter._pattern_ir import ValuePattern
from onnxscript.rewriter.pattern import MatchResult, OpsetPatternBuilder, Var

from kiln.optimize.fusions.base import FusionPass, has_ops


def _repeat_kv(
    op: OpsetPatternBuilder, kv: Var, axis: Var, shape5: ValuePattern, shape4: ValuePattern
) -> ValuePattern:
    repeated: ValuePattern = op.Reshape(op.Expand(op.Unsqueeze(kv, axis), shape5), shape4)
    return repeated


class SdpaAttentionFusion(pattern.RewriteRuleClassBase):
    """The lowered sdpa (with or without repeat_kv) -> Attention."""

    def __init__(self, name: str, *, gqa: bool) -> None:
        # remove_nodes=False: the mask bias and K's shape arithmetic are shared between layers
        # (other uses); matched nodes stay and remove-unused deletes what became dead.
        super().__init__(name=name, remove_nodes=False)
        self._gqa = gqa

    def pattern(
        self,
        op: OpsetPatternBuilder,
        q: Var,
        key: Var,
        value: Var,
        mask: Var,
        qs: Var,
        ks: Var,
        zero: Var,
        fill: Var,
        nan_zero: Var,
        s3: Var,
        s4: Var,
        rep: Var,
    ) -> ValuePattern:
        """The exporter's sdpa lowering, names as in the module docstring."""
        k: ValuePattern
        v: ValuePattern
        if self._gqa:
            k = _repeat_kv(op, key, rep, pattern.ANY_VALUE, pattern.ANY_VALUE)
            v = _repeat_kv(op, value, rep, pattern.ANY_VALUE, pattern.ANY_VALUE)
        else:
            k, v = key, value
        kt = op.Reshape(op.Transpose(op.Reshape(k, s3), perm=[0, 2, 1]), s4)
        scores = op.MatMul(op.Mul(q, qs), op.Mul(kt, ks))
        probs = op.Softmax(op.Add(scores, op.Where(mask, zero, fill)), axis=-1)
        probs = op.Where(op.IsNaN(probs), nan_zero, probs)
        out: ValuePattern = op.MatMul(probs, v)
        return out

    def check(
        self,
        op: MatchContext,
        q: ir.Value,
        key: ir.Value,
        value: ir.Value,
        mask: ir.Value,
        qs: ir.Value,
        ks: ir.Value,
        zero: ir.Value,
        **_: Any,
    ) -> MatchResult:
        """4-D q/k/v with heads divisible by KV heads, scalar scales, a bool mask."""
        result = MatchResult()
        for name, t in (("q", q), ("key", key), ("value", value)):
            if t.shape is None or len(t.shape) != 4:
                return result.fail(f"{name} is not known to be 4-D (BHSD)", t)
        assert q.shape is not None and key.shape is not None  # the loop returned otherwise
        h, hkv = q.shape[1], key.shape[1]
        if not isinstance(h, int) or not isinstance(hkv, int) or h % hkv:
            return result.fail(f"query heads {h} not a static multiple of KV heads {hkv}", key)
        if mask.dtype != ir.DataType.BOOL:
            return result.fail("the mask is not boolean", mask)
        q_scale = _ir_utils.get_singleton_value(qs)
        k_scale = _ir_utils.get_singleton_value(ks)
        if not isinstance(q_scale, float) or not isinstance(k_scale, float):
            return result.fail("q/k scales are not constant scalars")
        if _ir_utils.get_singleton_value(zero) != 0:
            return result.fail("the mask's pass value is not 0", zero)
        self._scale = q_scale * k_scale
        return result

    def rewrite(
        self, op: TapeBuilder, q: ir.Value, key: ir.Value, value: ir.Value, mask: ir.Value, **_: Any
    ) -> ir.Value:
        """One Attention node over the un-repeated KV heads."""
        attention: ir.Value = op.Attention(q, key, value, mask, scale=self._scale)
        return attention


class GroupedAttentionFusion(pattern.RewriteRuleClassBase):
    """kiln's grouped export attention (export/patches.py: _grouped_attention) -> Attention.

    The export stacks each KV group's query heads as rows instead of repeating K/V:
      Reshape(q)[B,Hkv,r*S,D] @ Transpose(K) * s -> Where(Not(mask repeated r times), min)
      -> Softmax (in fp32 for low precision: Cast around it) -> @ V -> Reshape [B,H,S,D]
    """

    def __init__(self, name: str, *, cast: bool, grouped: bool) -> None:
        super().__init__(name=name, remove_nodes=False)
        self._cast = cast
        self._grouped = grouped  # False: one query head per KV head, the Reshapes fold away

    def pattern(
        self,
        op: OpsetPatternBuilder,
        q: Var,
        key: Var,
        value: Var,
        mask: Var,
        qshape: Var,
        scale: Var,
        axis: Var,
        s5: Var,
        s4: Var,
        fill: Var,
        oshape: Var,
    ) -> ValuePattern:
        """The grouped lowering, names as in the class docstring."""
        rows_q = op.Reshape(q, qshape) if self._grouped else q
        scores = op.Mul(op.MatMul(rows_q, op.Transpose(key, perm=[0, 1, 3, 2])), scale)
        rows = op.Reshape(op.Expand(op.Unsqueeze(mask, axis), s5), s4)
        filled = op.Where(op.Not(rows), fill, scores)
        if self._cast:
            probs = op.Cast(op.Softmax(op.Cast(filled, to=ir.DataType.FLOAT), axis=-1))
        else:
            probs = op.Softmax(filled, axis=-1)
        out: ValuePattern = op.MatMul(probs, value)
        return op.Reshape(out, oshape) if self._grouped else out

    def check(
        self,
        op: MatchContext,
        q: ir.Value,
        key: ir.Value,
        value: ir.Value,
        mask: ir.Value,
        scale: ir.Value,
        **_: Any,
    ) -> MatchResult:
        """4-D q/k/v with heads divisible by KV heads, a constant scale, a 4-D bool mask."""
        result = MatchResult()
        for name, t in (("q", q), ("key", key), ("value", value), ("mask", mask)):
            if t.shape is None or len(t.shape) != 4:
                return result.fail(f"{name} is not known to be 4-D", t)
        # The loop returned unless every shape is known.
        assert q.shape is not None and key.shape is not None and mask.shape is not None
        h, hkv = q.shape[1], key.shape[1]
        if not isinstance(h, int) or not isinstance(hkv, int) or h % hkv:
            return result.fail(f"query heads {h} not a static multiple of KV heads {hkv}", key)
        if str(q.shape[2]) != str(mask.shape[2]):
            # The Reshape-free variant also matches inside a grouped form, where q is the
            # stacked [B, Hkv, r*S, D] rows: q's rows must be the mask's query rows.
            return result.fail(f"q rows {q.shape[2]} are not the mask's {mask.shape[2]}", q)
        if mask.dtype != ir.DataType.BOOL:
            return result.fail("the mask is not boolean", mask)
        value_s = _ir_utils.get_singleton_value(scale)
        if not isinstance(value_s, float):
            return result.fail("the scale is not a constant scalar", scale)
        self._scale = float(value_s)
        return result

    def rewrite(
        self, op: TapeBuilder, q: ir.Value, key: ir.Value, value: ir.Value, mask: ir.Value, **_: Any
    ) -> ir.Value:
        """One Attention node over the un-repeated KV heads, output [B, H, S, D]."""
        attention: ir.Value = op.Attention(q, key, value, mask, scale=self._scale)
        return attention


ATTENTION_RULES = pattern.RewriteRuleSet(
    [
        SdpaAttentionFusion.rule("SdpaGqaAttention", gqa=True),
        SdpaAttentionFusion.rule("SdpaAttention", gqa=False),
        *(
            GroupedAttentionFusion.rule(
                f"GroupedAttention{c * 'Cast'}{g * 'Gqa'}", cast=c, grouped=g
            )
            for c in (False, True)
            for g in (True, False)
        ),
    ]
)


class AttentionFusionPass(FusionPass):
    """Lowered sdpa -> Attention (opset 23) with native GQA; KV concat stays outside."""

    name = "attention"
    produces = "Attention"
    opset = 23
    needs_attention_kernel = True  # TensorRT-RTX has no fp32 IAttention kernel

    def rules(self, model: ir.Model) -> pattern.RewriteRuleSet:
        """Return the GQA and plain rules."""
        return ATTENTION_RULES

    def expected(self, model: ir.Model) -> str | None:
        """A lowered sdpa leaves Softmax and IsNaN behind; kiln's grouped form Softmax and Not."""
        if has_ops(model, "Softmax", "IsNaN"):
            return "the graph has Softmax and IsNaN (lowered sdpa)"
        if has_ops(model, "Softmax", "Not"):
            return "the graph has Softmax and Not (kiln's grouped attention)"
        return None


def expected_scale(head_dim: int) -> float:
    """Sdpa's default scale, 1/sqrt(D), for tests."""
    return 1 / math.sqrt(head_dim)
