"""The precision is read from the parsed graph's types: real TensorRT-RTX parses of tiny graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as h

from kiln.engine.builder import Backend
from kiln.engine.precision import precision_of
from kiln.engine.profiles import load_profile

pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")


def matmul_graph(path, *, act=TP.FLOAT16, weight=None, act_q=None):
    """y = x @ W with W plain, or weight-only DequantizeLinear(W_q), or QDQ on x too."""
    k, n = 32, 16
    nodes, inits = [], []
    x = "x"
    if act_q is not None:  # quantize the activation (not weight-only)
        inits.append(h.make_tensor("xs", act, [], [0.05]))
        nodes += [
            h.make_node("QuantizeLinear", ["x", "xs"], ["xq"], output_dtype=act_q),
            h.make_node("DequantizeLinear", ["xq", "xs"], ["xd"]),
        ]
        x = "xd"
    if weight is None:
        inits.append(h.make_tensor("W", act, [k, n], [1.0] * (k * n)))
        w = "W"
    else:
        qtype, axis, block = weight
        shape = [k, n]
        vals = np.ones(k * n, dtype=np.int8).tolist()
        inits.append(h.make_tensor("Wq", qtype, shape, vals))
        scale_shape = [k // block, n] if block else [n]
        inits.append(h.make_tensor("Ws", act, scale_shape, [0.01] * int(np.prod(scale_shape))))
        attrs = {"axis": axis, **({"block_size": block} if block else {})}
        nodes.append(h.make_node("DequantizeLinear", ["Wq", "Ws"], ["Wd"], **attrs))
        w = "Wd"
    nodes.append(h.make_node("MatMul", [x, w], ["y"]))
    graph = h.make_graph(
        nodes,
        "g",
        [h.make_tensor_value_info("x", act, [1, k])],
        [h.make_tensor_value_info("y", act, [1, n])],
        inits,
    )
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 21)]), path)
    return path


@pytest.mark.parametrize(
    ("kwargs", "label", "quantized"),
    [
        ({}, "fp16", {}),
        ({"act": TP.FLOAT}, "fp32", {}),
        ({"act": TP.BFLOAT16}, "bf16", {}),
        ({"weight": (TP.INT8, 1, 0)}, "int8", {"weights int8": 1}),
        ({"weight": (TP.INT4, 0, 16)}, "int4", {"weights int4": 1}),
        ({"weight": (TP.FLOAT8E4M3FN, 1, 0), "act_q": TP.FLOAT8E4M3FN}, "fp8", None),
        ({"weight": (TP.INT8, 1, 0), "act_q": TP.INT8}, "int8-activations", None),
    ],
)
def test_precision_from_graph_types(tmp_path, kwargs, label, quantized):
    backend = Backend(load_profile("rtx-ampere-ada-fp16"))
    net = backend.parse(matmul_graph(tmp_path / "m.onnx", **kwargs))
    found = precision_of(backend, net)
    assert found.label == label, found
    if quantized is not None:
        assert found.quantized == quantized
