"""The engine stage's guards: foreign-domain ops refused before parsing; dead builds cleaned up."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time

import onnx
import pytest
from onnx import TensorProto, helper

from kiln.artifacts import sha256_file
from kiln.engine import build_engine, read_engine
from kiln.engine.errors import ProfileError
from kiln.engine.guard import ForeignOpsError, foreign_ops
from kiln.manifests import ExportManifest, OptimizeManifest
from kiln.staging import remove_stale

PROFILE = "rtx-ampere-ada-fp16"


def _model(nodes, functions=(), extra_opsets=()):
    """x [1, 8] fp16 -> y [1, 8] through `nodes`, opset 23 plus the given domains."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8])],
        [helper.make_tensor("w", TensorProto.FLOAT16, [8], [1.0] * 8)],
    )
    opsets = [helper.make_opsetid("", 23), *(helper.make_opsetid(d, 1) for d in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def _artifact(tmp_path, model, min_cc="SM80"):
    """An artifact folder as `kiln optimize --target onnxruntime` would leave it (minimal)."""
    art = tmp_path / "art"
    art.mkdir()
    onnx.save(model, str(art / "model.onnx"))
    io = {
        "inputs": [{"name": "x", "dtype": "float16", "shape": [1, 8]}],
        "outputs": [{"name": "y", "dtype": "float16", "shape": [1, 8]}],
    }
    files = {"model.onnx": {"sha256": sha256_file(art / "model.onnx"), "bytes": 0}}
    config = {"vocab": 8, "max_positions": 8}
    ExportManifest(
        cache_key="", source={"path": str(tmp_path)}, architecture={}, config=config,
        exporter={"precision": "fp16"}, io=io, dynamic_axes={}, files=files, versions={},
        kv_cache={"layout": "concat"}, rope={}, weight_bytes=0, parity={}, elapsed_s={},
    ).write(art)  # fmt: skip
    OptimizeManifest(
        cache_key="", source={}, target="onnxruntime", precision="fp16", architecture={},
        config=config, io=io, contrib_ops={}, passes=[], files=files, versions={}, parity={},
        engine_hints={"attention_decomposable": False, "min_compute_capability": min_cc},
        elapsed_s=0.0,
    ).write(art)  # fmt: skip
    return art


def _contrib_graph():
    skip = helper.make_node(
        "SkipSimplifiedLayerNormalization", ["x", "x", "w"], ["n"], "norm0", domain="com.microsoft"
    )
    gqa = helper.make_node(
        "GroupQueryAttention", ["n"], ["a"], "layer0_gqa", domain="com.microsoft"
    )
    gqa2 = helper.make_node(
        "GroupQueryAttention", ["a"], ["y"], "layer1_gqa", domain="com.microsoft"
    )
    return _model([skip, gqa, gqa2], extra_opsets=["com.microsoft"])


def test_contrib_ops_are_refused_before_parsing_with_names_and_fix(tmp_path):
    art = _artifact(tmp_path, _contrib_graph())
    with pytest.raises(ForeignOpsError) as e:
        build_engine(art, PROFILE, tmp_path / "eng")
    msg = str(e.value)
    assert (
        "com.microsoft.GroupQueryAttention x2, com.microsoft.SkipSimplifiedLayerNormalization x1"
        in msg
    )
    assert "node 'layer0_gqa' (op GroupQueryAttention): domain 'com.microsoft'" in msg
    assert "node 'norm0' (op SkipSimplifiedLayerNormalization)" in msg
    assert "`kiln optimize --target tensorrt`" in msg and "--target onnxruntime" in msg
    assert "cannot parse" not in msg  # the guard spoke, not TensorRT's parser
    assert list(tmp_path.iterdir()) == [art]  # no engine, no staging folder


def test_engine_reads_the_graphs_minimum_compute_capability(tmp_path):
    """optimize.json engine_hints.min_compute_capability (fp8: SM89) is checked before parsing.

    Its negative control is the test above: SM80 lets the same folder reach the op guard.
    """
    art = _artifact(tmp_path, _contrib_graph(), min_cc="SM89")
    with pytest.raises(ProfileError, match=r"optimize\.json needs compute capability >= 8\.9"):
        build_engine(art, PROFILE, tmp_path / "eng")
    assert list(tmp_path.iterdir()) == [art]


def test_standard_graph_and_local_functions_pass_the_guard(tmp_path):
    """Negative control: standard ops, also inside a model-local function of a custom domain."""
    body = [helper.make_node("Mul", ["a", "b"], ["c"])]
    fn = helper.make_function(
        "kiln.local", "Scale", ["a", "b"], ["c"], body, [helper.make_opsetid("", 23)]
    )
    call = helper.make_node("Scale", ["x", "w"], ["y"], "scale0", domain="kiln.local")
    path = tmp_path / "ok.onnx"
    onnx.save(_model([call], [fn], ["kiln.local"]), str(path))
    assert foreign_ops(path) == []
    # The same function with a contrib op inside is caught through the call.
    body = [helper.make_node("FastGelu", ["a"], ["c"], "gelu_in_fn", domain="com.microsoft")]
    fn = helper.make_function(
        "kiln.local", "Scale", ["a", "b"], ["c"], body,
        [helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)],
    )  # fmt: skip
    onnx.save(_model([call], [fn], ["kiln.local", "com.microsoft"]), str(path))
    assert foreign_ops(path) == [("com.microsoft", "FastGelu", "gelu_in_fn")]


def test_kiln_export_passes_the_guard(exported):
    assert foreign_ops(exported("llama", "fp16", kv="static") / "model.onnx") == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _aged(path, seconds=3600):
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def test_stale_staging_is_removed_and_live_builds_are_kept(tmp_path):
    out = tmp_path / "eng"
    dead = tmp_path / ".eng.k1ll3d.tmp"
    dead.mkdir()
    (dead / "engine.plan").write_bytes(b"x" * 1000)
    _aged(dead)
    old = tmp_path / f".eng.old-{_dead_pid()}"
    old.mkdir()
    live = tmp_path / ".eng.l1ve.tmp"
    live.mkdir()
    _aged(live)
    young = tmp_path / ".eng.y0ung.tmp"  # maybe a build between mkdtemp and flock
    young.mkdir()
    other = tmp_path / ".other.k1ll3d.tmp"  # another output's folder
    other.mkdir()
    _aged(other)
    mine = tmp_path / f".eng.old-{os.getpid()}"  # a live publisher's
    mine.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build holds its folder
        assert sorted(p.name for p in remove_stale(out)) == sorted([dead.name, old.name])
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, young.name, other.name, mine.name]
    )
    assert [p.name for p in remove_stale(out)] == [live.name]  # its build is gone now


def test_next_build_removes_a_killed_builds_folder(exported, tmp_path):
    out = tmp_path / "eng"
    dead = tmp_path / ".eng.abcd1234.tmp"
    dead.mkdir()
    (dead / "engine.plan").write_bytes(b"half a plan")
    _aged(dead)
    build_engine(exported("llama", "fp16", kv="static"), PROFILE, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng"]
    assert read_engine(out).kv_cache["layout"] == "static"


def test_onnxruntime_target_output_is_refused(exported, tmp_path):
    """The real `kiln optimize --target onnxruntime` folder, not a hand-built one."""
    from kiln.optimize import optimize_model

    art = optimize_model(
        exported("llama", "fp32"), tmp_path / "ort", target="onnxruntime", precision="fp32"
    )
    with pytest.raises(ForeignOpsError, match=r"com\.microsoft\.GroupQueryAttention x2") as e:
        build_engine(art, PROFILE, tmp_path / "eng")
    assert "`kiln optimize --target tensorrt`" in str(e.value)
    assert not (tmp_path / "eng").exists()
