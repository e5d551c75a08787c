"""RoPE with constant frequencies -> com.microsoft RotaryEmbedding over a cos/sin cache.

The exporter computes RoPE as `x * cos + rotate_half(x) * sin` with
`cos = Unsqueeze(Cos(Concat(f, f)), 1)`, `f = Cast(Unsqueeze(position_ids, -1)) * inv_freq`.
onnxscript's cos_sin_cache fusion expects transformers' older `inv_freq @ position_ids` MatMul
form, so this rule is hand-written for the exporter's broadcast-Mul form. It fires only when
inv_freq is a constant (default, linear, llama3 RoPE); length-dependent variants (dynamic,
longrope) compute inv_freq in the graph and yarn scales cos/sin: those keep their RoPE subgraph.
Letters: B batch, H heads, S new tokens, D head dim, P max positions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchContext
from onnxscript.rewriter._context import TapeBuilder
from onnxscript.rewriter._pattern_ir import ValuePattern
from onnxscript.rewriter.pattern import MatchResult, OpsetPatternBuilder, Var


class RotaryCacheRule(pattern.RewriteRuleClassBase):
    """x_BHSD * cos + rotate_half(x) * sin -> RotaryEmbedding(x, position_ids, cos_PD2, sin_PD2)."""

    def __init__(self, max_positions: int) -> None:
        super().__init__("rotary-cache", remove_nodes=False)  # cos/sin are shared by layers
        self.max_positions = max_positions
        self._caches: dict[int, tuple[ir.Value, ir.Value]] = {}

    def pattern(
        self,
        op: OpsetPatternBuilder,
        x: Var,
        position_ids: Var,
        axes: Var,
        inv_freq: Var,
        cos_axes: Var,
        sin_axes: Var,
        s1: Var,
        e1: Var,
        s2: Var,
        e2: Var,
    ) -> ValuePattern:
        """X * cos + rotate_half(x) * sin with cos/sin from position_ids * inv_freq."""
        freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), cos_axes)
        sin = op.Unsqueeze(op.Sin(emb), sin_axes)
        x1 = op.Slice(x, s1, e1, [3], [1])
        x2 = op.Slice(x, s2, e2, [3], [1])
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        embedded: ValuePattern = op.Add(op.Mul(x, cos), op.Mul(rotated, sin))
        return embedded

    def check(
        self,
        op: MatchContext,
        x: ir.Value,
        position_ids: ir.Value,
        inv_freq: ir.Value,
        cos_axes: ir.Value,
        sin_axes: ir.Value,
        s1: ir.Value,
        e1: ir.Value,
        s2: ir.Value,
        e2: ir.Value,
        **_: Any,
    ) -> MatchResult:
        """Constant inv_freq over the graph's position_ids, full-width halves, 4-D x."""
        result = MatchResult()
        if inv_freq.const_value is None:
            why = "inv_freq is computed in the graph (length-dependent RoPE)"
            return result.fail(why, inv_freq)
        if position_ids not in op.model.graph.inputs:
            return result.fail("RoPE positions are not the graph input position_ids", position_ids)
        head = x.shape[3] if x.shape is not None and len(x.shape) == 4 else None
        if not isinstance(head, int):
            return result.fail("x is not [B, H, S, D] with a static head dim", x)
        half = head // 2
        if inv_freq.const_value.numpy().size != half:
            return result.fail("inv_freq does not cover half the head dim (partial RoPE)", inv_freq)
        for axes in (cos_axes, sin_axes):
            if not _ir_utils.is_singleton_value(axes, 1):
                return result.fail("cos/sin not unsqueezed at axis 1", axes)
        ok = (
            _ir_utils.is_singleton_value(s1, 0)
            and _ir_utils.is_singleton_value(e1, half)
            and _ir_utils.is_singleton_value(s2, half)
            and _ir_utils.is_singleton_value(e2, lambda v: v >= 2 * half)
        )
        return result if ok else result.fail("x is not split into two equal halves")

    def rewrite(
        self, op: TapeBuilder, x: ir.Value, position_ids: ir.Value, inv_freq: ir.Value, **_: Any
    ) -> ir.Value:
        """RotaryEmbedding(x, position_ids, cos[P, D/2], sin[P, D/2]), one cache per inv_freq."""
        key = id(inv_freq)
        if key not in self._caches:
            table = inv_freq.const_value
            assert table is not None  # check() refused a computed inv_freq
            # float32 as the exporter computes it (Cast(position) * inv_freq, then Cos/Sin).
            freq = table.numpy().astype(np.float32).reshape(1, -1)
            angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * freq
            cos = op.Constant(value=ir.tensor(np.cos(angles).astype(np.float32)))
            sin = op.Constant(value=ir.tensor(np.sin(angles).astype(np.float32)))
            self._caches[key] = (cos, sin)
        cos, sin = self._caches[key]
        embedded: ir.Value = op.RotaryEmbedding(
            x, position_ids, cos, sin, interleaved=0, _domain="com.microsoft"
        )
        return embedded
