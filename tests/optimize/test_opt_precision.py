"""Precision passes: strict types, TensorRT-RTX builds (SM86+SM89), parity within TOL."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from trt_build import build

from kiln.errors import KilnError
from kiln.optimize.typecheck import check_types
from kiln.parity import TOL

PRECISIONS = ("fp16", "bf16", "int8", "int4")
_ELEM = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_types_parity_and_io(optimized, exported, precision):
    out = optimized("llama", precision)
    proto = onnx.load(str(out / "model.onnx"))
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True)
    manifest = json.loads((out / "optimize.json").read_text())
    export = json.loads((exported("llama") / "export.json").read_text())
    names = lambda io: [v["name"] for v in io]  # noqa: E731
    assert names(manifest["io"]["inputs"]) == names(export["io"]["inputs"])
    assert names(manifest["io"]["outputs"]) == names(export["io"]["outputs"])
    act = _ELEM.get(precision, onnx.TensorProto.FLOAT16)
    assert {o.type.tensor_type.elem_type for o in proto.graph.output} == {act}
    parity = manifest["parity"]
    assert parity["ok"] and parity["torch"]["ok"], parity
    assert parity["greedy_64"] >= TOL[precision].agree
    floats = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    big = [t.name for t in floats if np.prod(t.dims) > 64]
    assert not big, f"fp32 weights left behind: {big}"
    if precision in ("int8", "int4"):
        dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
        assert len(dq) == 15  # q, k, v, o, gate, up, down per layer + lm_head
        assert all(a.i for n in dq for a in n.attribute if a.name == "block_size")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_tensorrt_rtx_builds_for_ampere_and_ada(optimized, precision):
    result = build(optimized("llama", precision) / "model.onnx", ("SM86", "SM89"))
    assert result["ok"], result["errors"]
    assert result["header"] == b"vtrt"
    assert {"ATTENTION_OUTPUT", "ROTARY_EMBEDDING"} <= set(result["types"])
    if precision in ("int8", "int4"):
        assert result["types"]["DEQUANTIZE"] == 15


def test_fp32_attention_needs_decomposable_in_tensorrt_rtx(optimized):
    from kiln.optimize.passes import CLEANUP, FUSIONS

    out = optimized("llama", "fp32", (*CLEANUP, *FUSIONS, "cse", "remove-unused"))
    result = build(out / "model.onnx")
    assert not result["ok"]  # why attention is fused only for fp16/bf16 by default
    assert json.loads((out / "optimize.json").read_text())["engine_hints"]["attention_decomposable"]


def test_strict_type_check_catches_float_times_half():  # negative control of the gate
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT16, [2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT16, [2])
    w = onnx.numpy_helper.from_array(np.ones(2, np.float32), "w")
    node = onnx.helper.make_node("Mul", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph([node], "g", [x], [y], initializer=[w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(KilnError, match="fails strict ONNX type checking"):
        check_types(ir.serde.deserialize_model(model), what="the test graph")


def test_fp8_qdq_builds_for_ada_only(optimized):
    out = optimized("llama", "fp8")
    proto = onnx.load(str(out / "model.onnx"))
    onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 9  # distinct MatMul inputs (q/k/v share one)
    assert ops.count("DequantizeLinear") == 9 + 15
    manifest = json.loads((out / "optimize.json").read_text())
    assert manifest["parity"]["ok"] and manifest["engine_hints"]["min_compute_capability"] == "SM89"
    assert build(out / "model.onnx", ("SM89",))["ok"]
    assert not build(out / "model.onnx", ("SM86", "SM89"))["ok"]  # FP8 needs SM89+


def test_onehot_tied_embedding_keeps_parity_and_builds(exported, tmp_path):
    from kiln.optimize import optimize_model

    out = optimize_model(
        exported("gpt2"), tmp_path / "o", precision="fp16", tied_embedding="onehot"
    )
    proto = onnx.load(str(out / "model.onnx"))
    nodes = proto.graph.node
    onehot = next(n.output[0] for n in nodes if n.op_type == "OneHot")
    table = next(n.input[1] for n in nodes if n.op_type == "MatMul" and n.input[0] == onehot)
    users = [n.op_type for n in nodes if table in n.input]
    assert sorted(users) == ["MatMul", "Transpose"]  # no Gather reads the tied table any more
    assert [n.op_type for n in proto.graph.node].count("OneHot") == 1
    parity = json.loads((out / "optimize.json").read_text())["parity"]
    assert parity["ok"] and parity["torch"]["ok"]
    assert build(out / "model.onnx")["ok"]
