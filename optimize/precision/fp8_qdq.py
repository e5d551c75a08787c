"""FP8 (E4M3) Q/DQ on every constant-weight MatMul/Gemm and its input activation.

Weights are quantized per output channel, the input activation per tensor. Engines with FP8
build only for SM89 and newer (TensorRT-RTX rejects SM80/SM86 targets: "HW-specific
datatypes: fp8_e4m3").

Scales:
- weight W[K,N]: one scale per output channel, s_w[n] = max_k |W[k,n]| / 448 (E4M3's largest
  finite value), applied by DequantizeLinear(axis=1) on the stored float8e4m3fn weight;
- activation x feeding that MatMul: one static scale, s_x = max |x| / 448, where max |x| is
  taken over calibration batches run through ONNX Runtime on the graph before this pass:
  `CALIBRATION_BATCHES` seeded batches of random token ids (batch 2, prefill of 16 tokens).
  Random tokens are a stand-in for real text: they give a scale from the model's own
  activation range, not from a data set (kiln has none offline); no margin, no percentile.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from kiln.errors import KilnError
from kiln.optimize.base import GraphPass, set_opset
from kiln.optimize.precision.weight_only import _weights
from kiln.optimize.typecheck import check_types
from kiln.steps import Result

E4M3_MAX = 448.0
CALIBRATION_BATCHES = 4
FP8 = ir.DataType.FLOAT8E4M3FN


def calibration_amax(model: ir.Model, values: list[ir.Value], vocab: int) -> dict[ir.Value, float]:
    """Max |v| for each of `values` over seeded random-token prefill batches (ORT CPU)."""
    from kiln.optimize.probe import ort_session_from_ir

    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    by_name = {v.name: v for n in probe.graph for v in n.outputs}
    by_name.update({v.name: v for v in probe.graph.inputs})
    for v in values:
        if not by_name[v.name].is_graph_output():
            probe.graph.outputs.append(by_name[v.name])
    sess = ort_session_from_ir(probe)
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(1234)
    amax = dict.fromkeys(values, 0.0)
    for _ in range(CALIBRATION_BATCHES):
        ids = rng.integers(3, vocab, size=(2, 16), dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds["position_ids"] = np.broadcast_to(np.arange(16), (2, 16)).astype(np.int64)
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values"):
                dtype = np.float16 if i.type == "tensor(float16)" else np.float32
                feeds[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), dtype)
        outs = dict(zip(names, sess.run(None, feeds), strict=True))
        for v in amax:
            amax[v] = max(amax[v], float(np.abs(outs[v.name].astype(np.float32)).max()))
    return amax


def _const(name: str, arr: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    return ir.val(name, const_value=ir.tensor(arr, dtype=dtype, name=name))


def _vocab(graph: ir.Graph) -> int:
    """The vocabulary size: the last dim of the logits, the graph's first output."""
    logits = graph.outputs[0]
    vocab = logits.shape[-1] if logits.shape is not None and len(logits.shape) else None
    if not isinstance(vocab, int):
        raise KilnError(
            f"fp8-qdq draws calibration token ids below the vocabulary size, but the graph's "
            f"first output {logits.name!r} has shape {logits.shape}, no static last dim; "
            "export the model with kiln export (its logits end in the vocabulary size)."
        )
    return vocab


class Fp8QdqPass(GraphPass):
    """MatMul/Gemm with constant weights -> FP8 E4M3 Q/DQ on the input and DQ on the weight."""

    name = "fp8-qdq"

    def __init__(self, vocab: int | None = None) -> None:
        self.vocab = vocab

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Calibrate activation scales, then insert Q/DQ; counts say what was quantized."""
        graph = model.graph
        pairs = _weights(graph)
        vocab = self.vocab or _vocab(graph)
        acts = list(dict.fromkeys(p.x for p in pairs))
        amax = calibration_amax(model, acts, vocab)
        qdq: dict[ir.Value, ir.Value] = {}
        deq: dict[ir.Value, ir.Value] = {}
        for node, x, w, data in pairs:
            act_np = np.float16 if w.dtype == ir.DataType.FLOAT16 else np.float32
            if x not in qdq:
                s = _const(f"{x.name}_fp8_scale", np.array(max(amax[x], 1e-6) / E4M3_MAX, act_np))
                z = _const(f"{x.name}_fp8_zero", np.zeros((), ml_dtypes.float8_e4m3fn), FP8)
                q = ir.node("QuantizeLinear", [x, s, z])
                q.outputs[0].type, q.outputs[0].shape = ir.TensorType(FP8), x.shape
                dq = ir.node("DequantizeLinear", [q.outputs[0], s])
                dq.outputs[0].type, dq.outputs[0].shape = x.type, x.shape
                for v in (s, z):
                    graph.register_initializer(v)
                graph.insert_before(node, [q, dq])
                qdq[x] = dq.outputs[0]
            if w not in deq:
                arr = data.numpy().astype(np.float32)
                scale = np.abs(arr).max(axis=0) / E4M3_MAX
                scale = np.where(scale == 0, 1.0, scale)
                wq = np.clip(arr / scale, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
                qv = _const(f"{w.name}_fp8", wq, FP8)
                sv = _const(f"{w.name}_fp8_scale", scale.astype(act_np))
                for v in (qv, sv):
                    graph.register_initializer(v)
                dw = ir.node("DequantizeLinear", [qv, sv], attributes={"axis": 1})
                dw.outputs[0].type, dw.outputs[0].shape = w.type, w.shape
                graph.insert_before(node, dw)
                deq[w] = dw.outputs[0]
            node.replace_input_with(0, qdq[x])
            node.replace_input_with(1, deq[w])
        for w in deq:
            if not w.uses() and w.name is not None and w.name in graph.initializers:
                del graph.initializers[w.name]
        if pairs:
            set_opset(model, 21)
        counts = {"weights": len(deq), "activations": len(qdq)}
        notes = [f"activation scales from max|x|/448 over {CALIBRATION_BATCHES} random batches"]
        return Result(model, changed=bool(pairs), counts=counts, notes=notes)

    def ensures(self, model: ir.Model) -> None:
        """The result must pass strict ONNX type checking."""
        check_types(model, what=f"the graph after {self.name}")
