"""The 2:4 option of a GPU profile: parsed from [builder], set as SPARSE_WEIGHTS, logged in
engine.json with its speed marked not measured (no GPU here)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kiln.engine.profiles import BuilderSettings, load_profile
from kiln.errors import ConfigError

trt = pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")

PROFILE = """
backend = "tensorrt-rtx"
compute_capabilities = ["8.6"]
precision = "fp16"

[profile.decode]
max_batch = 2
max_sequence = 1
max_context = 64
opt_context = 16

[builder]
sparse_weights = {value}
"""


def test_sparse_weights_is_a_boolean(tmp_path):
    path = tmp_path / "sparse.toml"
    path.write_text(PROFILE.format(value="true"))
    assert load_profile(path).builder.sparse_weights is True
    path.write_text(PROFILE.format(value='"yes"'))
    with pytest.raises(ConfigError, match=r"sparse_weights.*true or false"):
        load_profile(path)


def test_sparse_engine_records_the_flag_and_the_log(exported, tmp_path):
    from kiln.engine import build_engine, read_engine
    from kiln.optimize import default_passes, optimize_model
    from kiln.optimize.sparsity import is_2of4

    names = default_passes("fp16")
    onnx = optimize_model(exported("llama"), tmp_path / "sparse", precision="fp16",
                          passes=[*names[:-2], "sparse-2of4", *names[-2:]], allow_drift=True,
                          check_torch=False)  # fmt: skip
    import onnx as onnx_lib
    from onnx import numpy_helper

    proto = onnx_lib.load(str(onnx / "model.onnx"))
    mats = [numpy_helper.to_array(t) for t in proto.graph.initializer if len(t.dims) == 2]
    assert sum(is_2of4(m) for m in mats) >= 14
    gpu = load_profile("rtx-ampere-ada-fp16")
    sparse = replace(gpu, builder=BuilderSettings(sparse_weights=True))
    m = read_engine(build_engine(onnx, sparse, tmp_path / "engine"))
    record = m.build["sparse_weights"]
    assert record["flag"] is True and record["speed"] == "not measured"
    # Only TensorRT's sparsity lines, never others that merely name the (sparse) input file.
    assert all("sparse/model.onnx" not in line for line in record["log"])
    dense = read_engine(build_engine(onnx, gpu, tmp_path / "dense"))
    assert dense.build["sparse_weights"] == {"flag": False, "log": [], "speed": "not measured"}


def test_sparsity_lines_are_told_from_file_names():
    from kiln.engine.builder import _SPARSITY

    assert _SPARSITY.search("(Sparsity) Layers eligible for sparse math: gate_proj, up_proj")
    assert _SPARSITY.search("TRT inference plan picked sparse implementation for layers: x")
    assert not _SPARSITY.search("Input filename:   /tmp/run/sparse/model.onnx")
