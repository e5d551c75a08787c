"""Attention with a KV cache -> com.microsoft GroupQueryAttention (ONNX Runtime CPU kernel).

onnxscript's `fuse_gqa` expects transformers' repeat_kv + SDPA form and derives sequence lengths
from position_ids, which ignores left padding; the exporter emits a grouped-query form (concat
layout) and an opset-24 Attention over TensorScatter buffers (static layout), so both rules are
hand-written here. Letters: B batch/slots, S new tokens, T total tokens, M max_context,
H heads, Hkv KV heads, D head dim.

concat: present = Concat(past, new) and attention under causal & attention_mask. GQA gets the
  same past (P = T - S rows), seqlens_k = T - 1 for every row (left padding keeps all rows at
  length T), and the padding mask as attention_bias [B, 1, S, T] (0 or the float32 minimum);
  GQA adds causality itself (query s sits at P + s).
static: present = TensorScatter(past, new, write_index) and attention sees keys j <= write_index
  + i. GQA over the same buffer (past_present_share_buffer when the caller binds one OrtValue to
  both) with seqlens_k = write_index + S - 1 and query_seqlens = S: the S rows (padding included,
  as the exporter writes them) land at write_index, query i sits at write_index + i. Rows past a
  slot's length differ from TensorScatter's (unspecified instead of the old past), but no query
  reads them before they are rewritten.
Graphs with sliding windows are left alone (their mask is not plain causal; GQA's
local_window_size is not mapped here).
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

_MS = "com.microsoft"
_LOWEST = float(np.finfo(np.float32).min)


def _dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) <= axis:
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _bsd(op: TapeBuilder, x: ir.Value) -> ir.Value:
    """[B, H, S, D] -> [B, S, H*D], reusing the exporter's own BSD/BSHD tensors where there are.

    RoPE applied to Transpose(X_BSHD) moves onto the [B, S, H*D] tensor as a 3-D
    RotaryEmbedding, so the per-layer Transposes disappear instead of being undone by new ones.
    """
    node = x.producer()
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain == _MS:
        inner = node.inputs[0].producer() if node.inputs[0] is not None else None
        src = _bshd_source(inner)
        if src is not None:
            x3 = _flat(op, src)
            heads = _dim(x, 1)
            rotated: ir.Value = op.RotaryEmbedding(
                x3, *node.inputs[1:4], interleaved=0, num_heads=heads, _domain=_MS
            )
            return rotated
    src = _bshd_source(node)
    if src is not None:
        return _flat(op, src)
    return _flat(op, op.Transpose(x, perm=[0, 2, 1, 3]))


def _flat(op: TapeBuilder, x_BSHD: ir.Value) -> ir.Value:
    """[B, S, H, D] -> [B, S, H*D]; the projection's own output when X is Reshape(it)."""
    node = x_BSHD.producer()
    if node is not None and node.op_type == "Reshape" and node.inputs[0] is not None:
        src = node.inputs[0]
        h, d = _dim(x_BSHD, 2), _dim(x_BSHD, 3)
        if src.shape is not None and len(src.shape) == 3 and h and d and _dim(src, 2) == h * d:
            return src
    flat: ir.Value = op.Reshape(x_BSHD, op.Constant(value_ints=[0, 0, -1]))
    return flat


def _bshd_source(node: ir.Node | None) -> ir.Value | None:
    """X_BSHD where `node` is Transpose(X_BSHD, perm=[0, 2, 1, 3]), else None."""
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    perm = node.attributes.get("perm")
    return node.inputs[0] if perm is not None and list(perm.as_ints()) == [0, 2, 1, 3] else None


def _to_shape(
    op: TapeBuilder, out_BSX: ir.Value, shape: ir.Value, was: ir.Value, q: ir.Value
) -> ir.Value:
    """The exporter's final Reshape, dropped where it already gives [B, S, H*D] (GQA's output)."""
    h, d = _dim(q, 1), _dim(q, 3)
    dims = was.shape
    same_batch = q.shape is not None and dims is not None and dims[0] == q.shape[0]
    if dims is not None and len(dims) == 3 and h and d and dims[2] == h * d and same_batch:
        return out_BSX
    reshaped: ir.Value = op.Reshape(out_BSX, shape)
    return reshaped


def _heads(q: ir.Value, k: ir.Value) -> tuple[int, int] | str:
    h, hkv, d = _dim(q, 1), _dim(k, 1), _dim(q, 3)
    if h is None or hkv is None or d is None:
        return "query/key heads or head dim not static"
    if h % hkv:
        return f"query heads {h} not a multiple of KV heads {hkv}"
    return h, hkv


def _attention_node(att: ir.Value) -> ir.Node:
    """The Attention node the pattern matched, from its output `att`."""
    node = att.producer()
    assert node is not None  # `att` is a matched node's output
    return node


class _SharedValuesRule(pattern.RewriteRuleClassBase):
    """A rule whose rewrites share values built once per model (the mask, seqlens)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, remove_nodes=True)
        self._shared: dict[str, ir.Value] = {}

    def cleanup(self) -> None:
        """Forget the shared mask values: the next model builds its own."""
        self._shared.clear()


class ConcatGqaRule(_SharedValuesRule):
    """Concat-layout attention (grouped or per-head form) -> GroupQueryAttention."""

    def __init__(self) -> None:
        super().__init__("gqa-concat")

    def pattern(
        self,
        op: OpsetPatternBuilder,
        q: Var,
        k: Var,
        v: Var,
        past_k: Var,
        past_v: Var,
        masked_out: Var,
        fill: Var,
        scale: Var,
        out_shape: Var,
    ) -> tuple[ValuePattern, ValuePattern, ValuePattern]:
        """Concat past, (grouped) Q K^T * scale, Where(!mask, fill), Softmax, @ V, to BSD."""
        present_k = op.Concat(past_k, k, axis=-2)
        present_v = op.Concat(past_v, v, axis=-2)
        q_any = pattern.OrValue([op.Reshape(q, pattern.ANY_VALUE), q])
        scores = op.Mul(op.MatMul(q_any, op.Transpose(present_k, perm=[0, 1, 3, 2])), scale)
        # The negated mask is one node shared by every layer: a pattern input, checked below.
        probs = op.Softmax(op.Where(masked_out, fill, scores), axis=-1)
        out = op.MatMul(probs, present_v)
        out = pattern.OrValue([op.Reshape(out, pattern.ANY_VALUE), out])
        out = op.Reshape(op.Transpose(out, perm=[0, 2, 1, 3]), out_shape, _outputs=["attn_out"])
        return out, present_k, present_v

    def check(
        self,
        op: MatchContext,
        q: ir.Value,
        past_k: ir.Value,
        masked_out: ir.Value,
        fill: ir.Value,
        scale: ir.Value,
        **_: Any,
    ) -> MatchResult:
        """Static heads, constant scale, a large negative fill, an attention_mask input."""
        result = MatchResult()
        producer = masked_out.producer()
        if producer is None or producer.op_type != "Not":
            return result.fail("scores are not filled where Not(mask)", masked_out)
        heads = _heads(q, past_k)
        if isinstance(heads, str):
            return result.fail(heads, q)
        if _ir_utils.get_singleton_value(scale) is None:
            return result.fail("attention scale is not a constant", scale)
        fill_value = _ir_utils.get_singleton_value(fill)
        if fill_value is None or fill_value > -1e30:
            return result.fail("masked scores are not filled with a large negative", fill)
        if "attention_mask" not in {v.name for v in op.model.graph.inputs}:
            return result.fail("graph has no attention_mask input", q)
        self._model = op.model
        return result

    def _mask(self, op: TapeBuilder, model: ir.Model) -> dict[str, ir.Value]:
        if not self._shared:
            am = next(v for v in model.graph.inputs if v.name == "attention_mask")
            batch = op.Shape(am, start=0, end=1)
            total = op.Shape(am, start=1, end=2)
            ids = next(v for v in model.graph.inputs if v.name == "input_ids")
            seq = op.Shape(ids, start=1, end=2)
            one = op.Constant(value_ints=[1])
            seqlens = op.Cast(op.Expand(op.Sub(total, one), batch), to=ir.DataType.INT32)
            keep = op.Cast(am, to=ir.DataType.BOOL)
            bias = op.Where(keep, op.Constant(value_float=0.0), op.Constant(value_float=_LOWEST))
            bias = op.Unsqueeze(bias, op.Constant(value_ints=[1, 2]))
            shape = op.Concat(batch, one, seq, total, axis=0)
            self._shared = {
                "seqlens_k": seqlens,
                "total": op.Cast(op.Squeeze(total), to=ir.DataType.INT32),
                "query_seqlens": op.Cast(op.Expand(seq, batch), to=ir.DataType.INT32),
                "bias": op.Expand(bias, shape),
            }
        return self._shared

    def rewrite(
        self,
        op: TapeBuilder,
        q: ir.Value,
        k: ir.Value,
        v: ir.Value,
        past_k: ir.Value,
        past_v: ir.Value,
        scale: ir.Value,
        out_shape: ir.Value,
        attn_out: ir.Value,
        **_: Any,
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """GroupQueryAttention over the same past; the padding mask as attention_bias."""
        shared = self._mask(op, self._model)
        scale_value = float(_ir_utils.get_singleton_value(scale))
        qkv_past = (q, k, v, past_k, past_v)
        return _group_query_attention(op, qkv_past, shared, scale_value, (out_shape, attn_out))


class StaticGqaRule(_SharedValuesRule):
    """Opset-24 Attention over TensorScatter-written buffers -> GroupQueryAttention."""

    def __init__(self) -> None:
        super().__init__("gqa-static")

    def pattern(
        self,
        op: OpsetPatternBuilder,
        q: Var,
        k: Var,
        v: Var,
        past_k: Var,
        past_v: Var,
        write_index: Var,
        mask: Var,
        out_shape: Var,
    ) -> tuple[ValuePattern, ValuePattern, ValuePattern]:
        """TensorScatter K/V at write_index, opset-24 Attention over the buffers, to BSD."""
        present_k = op.TensorScatter(past_k, k, write_index, axis=-2, mode="linear")
        present_v = op.TensorScatter(past_v, v, write_index, axis=-2, mode="linear")
        att = op.Attention(
            q, present_k, present_v, mask, _allow_other_attributes=True, _outputs=["att"]
        )
        out = op.Reshape(op.Transpose(att, perm=[0, 2, 1, 3]), out_shape, _outputs=["attn_out"])
        return out, present_k, present_v

    def check(
        self,
        op: MatchContext,
        q: ir.Value,
        past_k: ir.Value,
        write_index: ir.Value,
        mask: ir.Value,
        att: ir.Value,
        **_: Any,
    ) -> MatchResult:
        """Static heads, write_index input, plain Attention, the plain causal slot mask."""
        result = MatchResult()
        heads = _heads(q, past_k)
        if isinstance(heads, str):
            return result.fail(heads, q)
        if write_index not in op.model.graph.inputs:
            return result.fail("write index is not the graph input write_index", write_index)
        self._model = op.model
        node = _attention_node(att)
        attrs = node.attributes
        for name in ("is_causal", "qk_matmul_output_mode"):
            if attrs.get_int(name, 0):
                return result.fail(f"Attention {name} != 0", node)
        if attrs.get_float("softcap", 0.0):
            return result.fail("Attention softcap is not mapped", node)
        producer = mask.producer()
        # The exporter's plain causal slot mask is one LessOrEqual(j, write_index + i); a
        # sliding window adds And(..., j > q - window), which GQA would not reproduce.
        if producer is None or producer.op_type != "LessOrEqual":
            return result.fail("mask is not the plain causal slot mask", mask)
        return result

    def rewrite(
        self,
        op: TapeBuilder,
        q: ir.Value,
        k: ir.Value,
        v: ir.Value,
        past_k: ir.Value,
        past_v: ir.Value,
        write_index: ir.Value,
        att: ir.Value,
        out_shape: ir.Value,
        attn_out: ir.Value,
        **_: Any,
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """GroupQueryAttention over the shared buffer, seqlens_k = write_index + S - 1."""
        if not self._shared:
            ids = next(v for v in self._model.graph.inputs if v.name == "input_ids")
            seq = op.Shape(ids, start=1, end=2)
            batch = op.Shape(write_index)
            last = op.Sub(op.Add(write_index, seq), op.Constant(value_ints=[1]))
            seqlens = op.Cast(last, to=ir.DataType.INT32)
            total = op.Add(op.ReduceMax(last, keepdims=0), op.Constant(value_int=1))
            self._shared = {
                "seqlens_k": seqlens,
                "total": op.Cast(total, to=ir.DataType.INT32),
                "query_seqlens": op.Cast(op.Expand(seq, batch), to=ir.DataType.INT32),
            }
        scale = _attention_node(att).attributes.get_float("scale", None)
        qkv_past = (q, k, v, past_k, past_v)
        return _group_query_attention(op, qkv_past, self._shared, scale, (out_shape, attn_out))


def _group_query_attention(
    op: TapeBuilder,
    qkv_past: tuple[ir.Value, ir.Value, ir.Value, ir.Value, ir.Value],
    shared: dict[str, ir.Value],
    scale: float | None,
    reshape: tuple[ir.Value, ir.Value],
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The GroupQueryAttention of both layouts: its output (shaped as matched) and K/V.

    `qkv_past` is (q, k, v, past_k, past_v) as matched; `shared` holds the per-model seqlens_k,
    total and query_seqlens, and `bias` (attention_bias) where the layout masks padding;
    `scale` None keeps GQA's default 1/sqrt(D); `reshape` is (out_shape, attn_out) of the
    matched final Reshape.
    """
    q, k, v, past_k, past_v = qkv_past
    heads = _heads(q, past_k)
    assert not isinstance(heads, str), heads  # check() refused the match otherwise
    h, hkv = heads
    extra = {"scale": scale} if scale else {}
    out, pk, pv = op.GroupQueryAttention(
        _bsd(op, q),
        _bsd(op, k),
        _bsd(op, v),
        past_k,
        past_v,
        shared["seqlens_k"],
        shared["total"],
        None,
        None,
        None,
        shared.get("bias"),
        None,
        None,
        None,
        None,
        None,
        shared["query_seqlens"],
        num_heads=h,
        kv_num_heads=hkv,
        _domain=_MS,
        _outputs=3,
        **extra,
    )
    return _to_shape(op, out, reshape[0], reshape[1], q), pk, pv
