"""Exported graphs parse and build in TensorRT-RTX (CPU-only, ahead of time)."""

from __future__ import annotations

import pytest

trt = pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")


def _parse(path):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # RTX networks are always strongly typed
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return builder, network, ok, errors


@pytest.mark.parametrize(
    ("name", "precision"),
    [("llama", "fp32"), ("gpt2", "fp32"), ("qwen3", "fp32"), ("llama", "fp16")],
)
def test_export_parses(exported, name, precision):
    _, network, ok, errors = _parse(exported(name, precision) / "model.onnx")
    assert ok, errors
    assert network.num_layers > 10
    names = {network.get_input(i).name for i in range(network.num_inputs)}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"} <= names


def test_fp16_export_builds_for_ampere_and_ada(exported):
    builder, network, ok, errors = _parse(exported("llama", "fp16") / "model.onnx")
    assert ok, errors
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 2
    cfg.set_compute_capability(trt.ComputeCapability.SM86, 0)
    cfg.set_compute_capability(trt.ComputeCapability.SM89, 1)
    prof = builder.create_optimization_profile()
    prof.set_shape("input_ids", (1, 1), (1, 16), (2, 64))
    prof.set_shape("position_ids", (1, 1), (1, 16), (2, 64))
    prof.set_shape("attention_mask", (1, 1), (1, 32), (2, 128))
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name.startswith("past_key_values"):
            prof.set_shape(t.name, (1, 2, 0, 16), (1, 2, 16, 16), (2, 2, 64, 16))
    cfg.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, cfg)
    assert plan is not None and plan.nbytes > 100_000
    assert bytes(plan)[:4] == b"vtrt"  # TensorRT-RTX plan header


def test_static_layout_parses_to_kv_cache_update_and_attention(exported):
    """TensorScatter becomes IKVCacheUpdateLayer and Attention becomes IAttention (native GQA)."""
    builder, network, ok, errors = _parse(exported("llama", "fp16", kv="static") / "model.onnx")
    assert ok, errors
    kinds = [network.get_layer(i).type for i in range(network.num_layers)]
    assert kinds.count(trt.LayerType.KV_CACHE_UPDATE) == 2 * 2  # K and V in each of 2 layers
    assert kinds.count(trt.LayerType.ATTENTION_INPUT) == 2
    cfg = builder.create_builder_config()
    cfg.num_compute_capabilities = 2
    cfg.set_compute_capability(trt.ComputeCapability.SM86, 0)
    cfg.set_compute_capability(trt.ComputeCapability.SM89, 1)
    prof = builder.create_optimization_profile()
    for name in ("input_ids", "position_ids"):
        prof.set_shape(name, (1, 1), (2, 1), (4, 64))
    prof.set_shape("write_index", (1,), (2,), (4,))
    for i in range(network.num_inputs):
        t = network.get_input(i)
        if t.name.startswith("past_key_values"):
            n = t.shape[2]
            prof.set_shape(t.name, (1, 2, n, 16), (2, 2, n, 16), (4, 2, n, 16))
    cfg.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, cfg)
    assert plan is not None and bytes(plan)[:4] == b"vtrt"
