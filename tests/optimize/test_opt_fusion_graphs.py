"""Each fusion on a tiny hand-built graph: rewrite count, op types, same outputs, and a miss."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from kiln.optimize.passes import PASSES
from kiln.optimize.probe import ort_session_from_ir

F = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits=(), opset=18) -> ir.Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto = onnx.shape_inference.infer_shapes(proto)
    return ir.serde.deserialize_model(proto)


def _c(name, value, dtype=np.float32):
    return helper.make_tensor(
        name,
        *_np_type(dtype),
        np.asarray(value, dtype).shape,
        np.asarray(value, dtype).ravel().tolist(),
    )


def _np_type(dtype):
    return ({np.float32: F, np.int64: TensorProto.INT64}[dtype],)


def _run(model: ir.Model, feeds):
    return ort_session_from_ir(model).run(None, feeds)


def _fuse(name: str, model: ir.Model):
    result = PASSES[name]().run(model)
    PASSES["remove-unused"]().run(result.value)
    return result, [n.op_type for n in result.value.graph]


def _vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def rms_graph(eps_const: bool = True) -> ir.Model:
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1, noop_with_empty_axes=0),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["n"]),
        helper.make_node("Mul", ["w", "n"], ["y"]),
    ]
    inits = [_c("two", 2.0), _c("axes", [-1], np.int64), _c("w", RNG.normal(size=8))]
    inputs = [_vi("x", [2, 3, 8])]
    if eps_const:
        inits.append(_c("eps", 1e-6))
    else:
        inputs.append(_vi("eps", []))
    return _model(nodes, inputs, [_vi("y", [2, 3, 8])], inits)


def gelu_graph(cube: float = 0.044715) -> ir.Model:
    nodes = [
        helper.make_node("Mul", ["x", "half"], ["hx"]),
        helper.make_node("Pow", ["x", "three"], ["x3"]),
        helper.make_node("Mul", ["x3", "cube"], ["cx3"]),
        helper.make_node("Add", ["x", "cx3"], ["inner"]),
        helper.make_node("Mul", ["inner", "s2pi"], ["arg"]),
        helper.make_node("Tanh", ["arg"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["t1"]),
        helper.make_node("Mul", ["hx", "t1"], ["y"]),
    ]
    inits = [_c("half", 0.5), _c("three", 3.0), _c("cube", cube), _c("one", 1.0)]
    inits.append(_c("s2pi", math.sqrt(2 / math.pi)))
    return _model(nodes, [_vi("x", [2, 3, 16])], [_vi("y", [2, 3, 16])], inits)


def rotary_graph(axis: int = 1) -> ir.Model:
    nodes = [
        helper.make_node("Concat", ["f", "f"], ["ff"], axis=-1),
        helper.make_node("Cos", ["ff"], ["cos"]),
        helper.make_node("Sin", ["ff"], ["sin"]),
        helper.make_node("Unsqueeze", ["cos", "ax"], ["cos4"]),
        helper.make_node("Unsqueeze", ["sin", "ax"], ["sin4"]),
        helper.make_node("Mul", ["x", "cos4"], ["xc"]),
        helper.make_node("Slice", ["x", "s0", "s4", "a3", "st"], ["x1"]),
        helper.make_node("Slice", ["x", "s4", "big", "a3", "st"], ["x2"]),
        helper.make_node("Neg", ["x2"], ["nx2"]),
        helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
        helper.make_node("Mul", ["rot", "sin4"], ["rs"]),
        helper.make_node("Add", ["xc", "rs"], ["y"]),
    ]
    ints = {"ax": [axis], "s0": [0], "s4": [4], "big": [2**62], "a3": [3], "st": [1]}
    inits = [_c(k, v, np.int64) for k, v in ints.items()]
    inputs = [_vi("x", [1, 2, 5, 8]), _vi("f", [1, 5, 4])]
    return _model(nodes, inputs, [_vi("y", [1, 2, 5, 8])], inits)


def attention_graph(const_scale: bool = True) -> ir.Model:
    """The dynamo exporter's sdpa lowering with repeat_kv: H=4, Hkv=2, S=3, T=5, D=8."""
    s = 8**-0.25
    nodes = [
        helper.make_node("Unsqueeze", ["k", "ax2"], ["k5"]),
        helper.make_node("Expand", ["k5", "shape5"], ["ke"]),
        helper.make_node("Reshape", ["ke", "shape4"], ["kr"]),
        helper.make_node("Unsqueeze", ["v", "ax2"], ["v5"]),
        helper.make_node("Expand", ["v5", "shape5"], ["ve"]),
        helper.make_node("Reshape", ["ve", "shape4"], ["vr"]),
        helper.make_node("Reshape", ["kr", "shape3"], ["k3"]),
        helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
        helper.make_node("Reshape", ["k3t", "shape4t"], ["kt"]),
        helper.make_node("Mul", ["q", "qs"], ["qq"]),
        helper.make_node("Mul", ["kt", "ks"], ["kk"]),
        helper.make_node("MatMul", ["qq", "kk"], ["scores"]),
        helper.make_node("Where", ["mask", "zero", "fill"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["sb"]),
        helper.make_node("Softmax", ["sb"], ["p"], axis=-1),
        helper.make_node("IsNaN", ["p"], ["nan"]),
        helper.make_node("Where", ["nan", "zero", "p"], ["pp"]),
        helper.make_node("MatMul", ["pp", "vr"], ["y"]),
    ]
    shapes = {"ax2": [2], "shape5": [1, 2, 2, 5, 8], "shape4": [1, 4, 5, 8], "shape3": [4, 5, 8]}
    shapes["shape4t"] = [1, 4, 8, 5]
    inits = [_c(k, v, np.int64) for k, v in shapes.items()]
    inits += [_c("zero", 0.0), _c("fill", np.finfo(np.float32).min), _c("ks", s)]
    inputs = [_vi("q", [1, 4, 3, 8]), _vi("k", [1, 2, 5, 8]), _vi("v", [1, 2, 5, 8])]
    inputs.append(_vi("mask", [1, 1, 3, 5], TensorProto.BOOL))
    if const_scale:
        inits.append(_c("qs", s))
    else:
        inputs.append(_vi("qs", []))
    return _model(nodes, inputs, [_vi("y", [1, 4, 3, 8])], inits)


def _feeds(model: ir.Model):
    out = {}
    for v in model.graph.inputs:
        shape = [int(d) for d in v.shape]
        if v.dtype == ir.DataType.BOOL:
            out[v.name] = np.tril(np.ones(shape, bool), k=2)  # causal over 2 past positions
        else:
            out[v.name] = RNG.normal(size=shape).astype(np.float32)
            if v.name == "qs":
                out[v.name] = np.array(8**-0.25, np.float32)
    return out


CASES = {
    "rms-norm": (rms_graph, "RMSNormalization", 1, {"Pow", "ReduceMean", "Reciprocal"}),
    "gelu": (gelu_graph, "Gelu", 1, {"Tanh", "Pow"}),
    "rotary-embedding": (rotary_graph, "RotaryEmbedding", 1, {"Neg", "Slice"}),
    "attention": (attention_graph, "Attention", 1, {"Softmax", "Expand", "IsNaN"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fusion_on_hand_built_graph(name):
    make, produced, count, gone = CASES[name]
    model = make()
    feeds = _feeds(model)
    ref = _run(model, feeds)[0]
    result, ops = _fuse(name, model)
    assert result.counts == {produced: count}
    assert ops.count(produced) == 1
    assert not gone & set(ops), ops
    got = _run(result.value, feeds)[0]
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    assert result.value.opset_imports[""] >= PASSES[name].opset


def test_layer_norm_with_bias_becomes_one_op():
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=1),
        helper.make_node("Sub", ["x", "m"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["dd"]),
        helper.make_node("ReduceMean", ["dd", "axes"], ["var"], keepdims=1),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Mul", ["n", "w"], ["nw"]),
        helper.make_node("Add", ["nw", "b"], ["y"]),
    ]
    inits = [_c("axes", [-1], np.int64), _c("eps", 1e-5), _c("w", RNG.normal(size=8))]
    inits.append(_c("b", RNG.normal(size=8)))
    model = _model(nodes, [_vi("x", [2, 3, 8])], [_vi("y", [2, 3, 8])], inits)
    feeds = _feeds(model)
    ref = _run(model, feeds)[0]
    result, ops = _fuse("layer-norm", model)
    assert ops == ["LayerNormalization"]
    assert result.counts["LayerNormalization"] == 2  # the norm, then its bias folded in
    np.testing.assert_allclose(_run(result.value, feeds)[0], ref, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "model", "why"),
    [
        ("rms-norm", lambda: rms_graph(eps_const=False), "Epsilon is not a float value"),
        ("gelu", lambda: gelu_graph(cube=0.05), "constant is not 0.044715"),
        ("rotary-embedding", lambda: rotary_graph(axis=2), "not unsqueezed at axis 1"),
        ("attention", lambda: attention_graph(const_scale=False), "scales are not constant"),
    ],
)
def test_a_near_miss_is_not_fused_and_says_why(name, model, why):  # negative controls
    result, _ = _fuse(name, model())
    assert result.counts == {CASES[name][1]: 0}
    assert not result.changed
    assert any(why in note for note in result.notes), result.notes


def grouped_attention_graph(const_scale: bool = True) -> ir.Model:
    """kiln's grouped export attention (export/patches.py): H=4, Hkv=2, S=3, T=5, D=8."""
    nodes = [
        helper.make_node("Reshape", ["q", "qshape"], ["qg"]),
        helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["qg", "kt"], ["sc"]),
        helper.make_node("Mul", ["sc", "scale"], ["ss"]),
        helper.make_node("Unsqueeze", ["mask", "ax2"], ["m5"]),
        helper.make_node("Expand", ["m5", "shape5"], ["me"]),
        helper.make_node("Reshape", ["me", "shape4"], ["mr"]),
        helper.make_node("Not", ["mr"], ["nm"]),
        helper.make_node("Where", ["nm", "fill", "ss"], ["filled"]),
        helper.make_node("Softmax", ["filled"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v"], ["og"]),
        helper.make_node("Reshape", ["og", "oshape"], ["y"]),
    ]
    shapes = {"qshape": [1, 2, 6, 8], "ax2": [2], "shape5": [1, 1, 2, 3, 5]}
    shapes |= {"shape4": [1, 1, 6, 5], "oshape": [1, 4, 3, 8]}
    inits = [_c(k, v, np.int64) for k, v in shapes.items()]
    inits.append(_c("fill", np.finfo(np.float32).min))
    inputs = [_vi("q", [1, 4, 3, 8]), _vi("k", [1, 2, 5, 8]), _vi("v", [1, 2, 5, 8])]
    inputs.append(_vi("mask", [1, 1, 3, 5], TensorProto.BOOL))
    if const_scale:
        inits.append(_c("scale", 8**-0.5))
    else:
        inputs.append(_vi("scale", []))
    return _model(nodes, inputs, [_vi("y", [1, 4, 3, 8])], inits)


def test_grouped_attention_becomes_one_op():
    model = grouped_attention_graph()
    feeds = _feeds(model)
    ref = _run(model, feeds)[0]
    result, ops = _fuse("attention", model)
    assert result.counts == {"Attention": 1}
    assert ops == ["Attention"], ops  # the Reshapes, mask repeat, Not/Where and Softmax are gone
    np.testing.assert_allclose(_run(result.value, feeds)[0], ref, atol=2e-5, rtol=1e-4)


def test_grouped_attention_near_miss_says_why():  # negative control
    result, _ = _fuse("attention", grouped_attention_graph(const_scale=False))
    assert result.counts == {"Attention": 0}
    assert any("scale is not a constant scalar" in note for note in result.notes), result.notes
