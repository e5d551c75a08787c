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

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import _ir_utils, pattern


class RotaryCacheRule(pattern.RewriteRuleClassBase):
    """x_BHSD * cos + rotate_half(x) * sin -> RotaryEmbedding(x, position_ids, cos_PD2, sin_PD2)."""

    def __init__(self, max_positions: int) -> None:
        super().__init__("rotary-cache", remove_nodes=False)  # cos/sin are shared by layers
        self.max_positions = max_positions
        self._caches: dict[int, tuple[ir.Value, ir.Value]] = {}

    def pattern(self, op, x, position_ids, axes, inv_freq, cos_axes, sin_axes, s1, e1, s2, e2):
        """X * cos + rotate_half(x) * sin with cos/sin from position_ids * inv_freq."""
        freqs = op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)
        emb = op.Concat(freqs, freqs, axis=-1)
        cos = op.Unsqueeze(op.Cos(emb), cos_axes)
        sin = op.Unsqueeze(op.Sin(emb), sin_axes)
        x1 = op.Slice(x, s1, e1, [3], [1])
        x2 = op.Slice(x, s2, e2, [3], [1])
        rotated = op.Concat(op.Neg(x2), x1, axis=-1)
        return op.Add(op.Mul(x, cos), op.Mul(rotated, sin))

    def check(self, context, x, position_ids, inv_freq, cos_axes, sin_axes, s1, e1, s2, e2, **_):
        """Constant inv_freq over the graph's position_ids, full-width halves, 4-D x."""
        result = pattern.MatchResult()
        if inv_freq.const_value is None:
            why = "inv_freq is computed in the graph (length-dependent RoPE)"
            return result.fail(why, inv_freq)
        if position_ids not in context.model.graph.inputs:
            return result.fail("RoPE positions are not the graph input position_ids", position_ids)
        if x.shape is None or len(x.shape) != 4 or not isinstance(x.shape[3], int):
            return result.fail("x is not [B, H, S, D] with a static head dim", x)
        half = x.shape[3] // 2
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

    def rewrite(self, op, x, position_ids, inv_freq, **_):
        """RotaryEmbedding(x, position_ids, cos[P, D/2], sin[P, D/2]), one cache per inv_freq."""
        key = id(inv_freq)
        if key not in self._caches:
            # float32 as the exporter computes it (Cast(position) * inv_freq, then Cos/Sin).
            freq = inv_freq.const_value.numpy().astype(np.float32).reshape(1, -1)
            angles = np.arange(self.max_positions, dtype=np.float32)[:, None] * freq
            cos = op.Constant(value=ir.tensor(np.cos(angles).astype(np.float32)))
            sin = op.Constant(value=ir.tensor(np.sin(angles).astype(np.float32)))
            self._caches[key] = (cos, sin)
        cos, sin = self._caches[key]
        return op.RotaryEmbedding(x, position_ids, cos, sin, interleaved=0, _domain="com.microsoft")
