"""kiln/graph_io.py: the one position rule, the signature, and one stepper per KV layout."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from kiln.errors import ArtifactError
from kiln.graph_io import (
    ConcatStepper,
    StaticStepper,
    io_signature,
    ort_session,
    positions,
    stepper,
)
from kiln.layouts import CONCAT, STATIC


def test_positions_count_real_tokens_and_give_padding_one():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert positions(mask).tolist() == [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_io_signature_names_bf16(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.BFLOAT16, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, ["batch", 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "m.onnx"))
    io = io_signature(tmp_path / "m.onnx")
    assert io["inputs"] == [{"name": "x", "dtype": "bfloat16", "shape": ["batch", 4]}]


def test_each_layout_gets_its_stepper_and_refuses_the_other(exported):
    concat = exported("llama") / "model.onnx"
    static = exported("llama", kv="static") / "model.onnx"
    assert isinstance(stepper(concat), ConcatStepper) and stepper(concat).layout is CONCAT
    assert isinstance(stepper(static, rows=2), StaticStepper)
    assert stepper(static).layout is STATIC
    with pytest.raises(ArtifactError, match="not the concat KV layout"):
        ConcatStepper(ort_session(static))


def test_both_layouts_agree_through_the_numpy_surface(exported):
    """The same greedy prefix through either layout's stepper: one contract, two layouts."""
    prompt = np.array([[5, 6, 7, 8, 9]], np.int64)
    got = []
    for path in (exported("llama"), exported("llama", kv="static")):
        run = stepper(path / "model.onnx")
        run.reset(1)
        logits = run.append(prompt, 0)
        nxt = np.array([[int(np.argmax(logits[0, -1]))]], np.int64)
        got.append((logits[0, -1], run.append(nxt, prompt.shape[1])[0, -1]))
    np.testing.assert_allclose(got[0][0], got[1][0], atol=1e-4)
    np.testing.assert_allclose(got[0][1], got[1][1], atol=1e-4)


def test_static_cache_round_trips_and_is_read(exported):
    """load_cache writes the in-place buffers; a corrupted cache changes the next logits."""
    run = stepper(exported("llama", kv="static") / "model.onnx", rows=1)
    assert isinstance(run, StaticStepper)
    run.append(np.array([[3, 4, 5]], np.int64), 0)
    cache = run.cache()
    want = run.append(np.array([[6]], np.int64), 3)
    run.load_cache(cache)
    np.testing.assert_allclose(run.append(np.array([[6]], np.int64), 3), want, atol=1e-6)
    bad = [c.copy() for c in cache]
    bad[0][0, :, 1] += 1.0  # a key the slot wrote
    run.load_cache(bad)
    assert np.abs(run.append(np.array([[6]], np.int64), 3) - want).max() > 1e-3
