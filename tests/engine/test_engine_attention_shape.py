"""An fp16 attention shape TensorRT-RTX has no fused kernel for still builds (decomposed).

The eval model (models/eval-llama: 2 query heads over 1 KV head of 64) optimized for TensorRT at
fp16 with fusions: TensorRT-RTX 1.7 rejects its IAttention layers ("Attention operation was not
supported by a dedicated kernel"), and the engine stage builds again with them decomposable
(engine/__init__.py, engine/attention.py). Real parse and builds, no mocks.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.engine import build_engine, load_profile, read_engine
from kiln.engine.attention import NO_ATTENTION_KERNEL, mark_decomposable
from kiln.engine.builder import Backend
from kiln.engine.errors import EngineBuildError
from kiln.engine.shapes import input_ranges

pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")

EVAL = Path(__file__).resolve().parents[2] / "models" / "eval-llama"
PROFILE = "rtx-ampere-ada-fp16"


@pytest.fixture(scope="module")
def eval_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from kiln.export import export_model
    from kiln.optimize import optimize_model

    work = tmp_path_factory.mktemp("eval-fp16")
    onnx = export_model(EVAL, work / "onnx", precision="fp32")
    return optimize_model(onnx, work / "opt", target="tensorrt", precision="fp16")


def test_the_engine_builds_with_attention_decomposed_and_says_why(eval_fp16, tmp_path):
    m = read_engine(build_engine(eval_fp16, load_profile(PROFILE), tmp_path))
    assert m.precision["label"] == "fp16"
    assert m.attention == {
        "layers": 4,
        "decomposable": 4,
        "why": "no dedicated kernel for this attention shape (first build failed)",
    }


def test_built_as_parsed_the_same_network_fails_with_the_attention_error(eval_fp16):
    """Negative control: without the second build the fp16 graph does not build at all."""
    from kiln.engine import _plan_shapes
    from kiln.manifests import newest_manifest

    gpu = load_profile(PROFILE)
    backend = Backend(gpu)
    net = backend.parse(eval_fp16 / "model.onnx")
    assert mark_decomposable(backend, net, None)["decomposable"] == 0  # fp16: left fused
    io, _, shapes = _plan_shapes(gpu, newest_manifest(eval_fp16))
    cfg = backend.configure(net, gpu, [input_ranges(io["inputs"], s) for s in shapes])
    with pytest.raises(EngineBuildError, match=NO_ATTENTION_KERNEL):
        backend.build(net, cfg)
