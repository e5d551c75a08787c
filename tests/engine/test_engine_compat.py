"""The runtime's gate: an engine runs only on its compute capabilities and exact library version."""

from __future__ import annotations

import pytest

from kiln.engine import check_engine_compatible, engine_mismatches
from kiln.engine.errors import EngineMismatchError, ProfileError
from kiln.engine.profiles import ShapeRange
from kiln.engine.shapes import input_ranges, tensor_ranges
from kiln.manifests import EngineManifest

MANIFEST = EngineManifest(
    cache_key="",
    source={},
    profile={"name": "rtx-ampere-ada-fp16"},
    compute_capabilities=["8.6", "8.9"],
    library={"name": "tensorrt_rtx", "version": "1.7.1.116"},
    precision={},
    io={},
    kv_cache={"layout": "concat"},
    attention={},
    optimization_profiles=[],
    plan={},
    build={},
)


@pytest.mark.parametrize("cc", ["8.6", "8.9", (8, 9)])
def test_matching_gpu_and_library_pass(cc):
    check_engine_compatible(MANIFEST, cc, "tensorrt_rtx", "1.7.1.116")
    assert engine_mismatches(MANIFEST, cc, "tensorrt_rtx", "1.7.1.116") == []


@pytest.mark.parametrize(
    ("cc", "library", "version", "message"),
    [
        (
            "8.0",
            "tensorrt_rtx",
            "1.7.1.116",
            r"built for compute capabilities 8.6, 8.9, not this GPU's 8.0",
        ),
        ((12, 0), "tensorrt_rtx", "1.7.1.116", r"not this GPU's 12.0"),
        (
            "8.9",
            "tensorrt_rtx",
            "1.7.2.1",
            r"built with tensorrt_rtx 1.7.1.116, but 1.7.2.1 is installed",
        ),
        ("8.9", "tensorrt", "1.7.1.116", r"built with tensorrt_rtx, but the runtime uses tensorrt"),
    ],
)
def test_mismatches_are_refused_with_the_reason(cc, library, version, message):
    with pytest.raises(
        EngineMismatchError, match=r"'rtx-ampere-ada-fp16' cannot run here: .*" + message
    ):
        check_engine_compatible(MANIFEST, cc, library, version)


def test_every_mismatch_is_listed():
    assert len(engine_mismatches(MANIFEST, "7.5", "tensorrt_rtx", "2.0")) == 2


IO = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
        {"name": "past.0", "dtype": "float16", "shape": ["batch", 2, "past_sequence", 8]},
    ],
    "outputs": [
        {
            "name": "present.0",
            "dtype": "float16",
            "shape": ["batch", 2, "past_sequence + sequence", 8],
        }
    ],
}


def test_output_ranges_follow_the_axis_expressions():
    s = ShapeRange(
        "prefill", max_batch=4, max_sequence=16, max_context=64, opt_sequence=8, opt_context=8
    )
    assert input_ranges(IO["inputs"], s)["past.0"] == ((1, 2, 0, 8), (1, 2, 0, 8), (4, 2, 63, 8))
    present = tensor_ranges(IO, s)["present.0"]
    assert (present["min"], present["opt"], present["max"]) == (
        [1, 2, 1, 8],
        [1, 2, 8, 8],
        [4, 2, 79, 8],
    )


def test_an_axis_the_profile_cannot_size_is_named():
    io = {
        "inputs": [{"name": "pixel_values", "dtype": "float16", "shape": ["batch", "height"]}],
        "outputs": [],
    }
    s = ShapeRange("decode", max_batch=1, max_sequence=1, max_context=8)
    with pytest.raises(
        ProfileError,
        match=r"'pixel_values' has axis 'height', which GPU profile shape 'decode' cannot size",
    ):
        input_ranges(io["inputs"], s)


def test_heartbeat_reports_elapsed_time(caplog):
    import logging
    import time

    from kiln.engine.progress import heartbeat

    with caplog.at_level(logging.INFO, logger="kiln"), heartbeat("engine x", every_s=0.05):
        time.sleep(0.3)
    assert "engine x: 0 s elapsed" in caplog.text


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("tensorrt") is not None, reason="full TensorRT is here"
)
def test_data_center_profile_without_tensorrt_names_the_way_out():
    from kiln.engine.builder import Backend
    from kiln.engine.errors import EngineBuildError
    from kiln.engine.profiles import load_profile

    with pytest.raises(
        EngineBuildError, match=r"'a100-bf16' needs full TensorRT .* run `kiln build` on a 8.0 host"
    ):
        Backend(load_profile("a100-bf16"))


@pytest.mark.skipif(__import__("shutil").which("nvidia-smi") is not None, reason="a GPU host")
def test_full_tensorrt_refuses_to_build_without_the_target_gpu():
    from kiln.engine.builder import _check_local_gpu
    from kiln.engine.errors import EngineBuildError
    from kiln.engine.profiles import load_profile

    with pytest.raises(
        EngineBuildError, match=r"'h100-fp8' uses full TensorRT.* no GPU answers here"
    ):
        _check_local_gpu(load_profile("h100-fp8"))
