"""An int8 weight-only engine of the bundled model, from the optimize stage's artifact."""

from __future__ import annotations

import pytest

from kiln.engine import build_engine, read_engine
from kiln.engine.errors import ProfileError

trt = pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")


@pytest.fixture(scope="module")
def zen_int8(exported, tmp_path_factory):
    from kiln.optimize import optimize_model

    out = tmp_path_factory.mktemp("zen-int8") / "optimized-int8"
    return optimize_model(exported("zen", "fp16"), out, precision="int8")


def test_int8_weight_only_engine(zen_int8, tmp_path):
    out = build_engine(zen_int8, "rtx-ampere-ada-int8wo", tmp_path / "int8")
    m = read_engine(out)
    plan = (out / "engine.plan").read_bytes()
    assert plan[:4] == b"vtrt" and plan[0x20] == 0x04 | 0x08  # SM86 + SM89
    assert m.source["stage"] == "optimize"
    assert m.precision["label"] == "int8"
    assert m.precision["activations"] == "float16"
    # Every matrix of the 4-layer model (7 per layer) plus the LM head is stored as int8.
    assert m.precision["quantized"] == {"weights int8": 29}
    assert m.optimization_profiles[0]["tensors"]["logits"]["dtype"] == "float16"


def test_fp16_profile_refuses_the_int8_artifact(zen_int8, tmp_path):
    with pytest.raises(
        ProfileError,
        match=r"is int8 \(activations float16; 29 weights int8 tensors\), but GPU profile "
        r"'rtx-ampere-ada-fp16' builds fp16.*pick a int8 profile \(rtx-ampere-ada-int8wo\)",
    ):
        build_engine(zen_int8, "rtx-ampere-ada-fp16", tmp_path / "x")
