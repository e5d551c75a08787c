"""Static-KV artifacts through TensorRT-RTX: in-place cache updates, slot profiles, manifest.

Real parses and builds on this CPU-only machine (no mocks); the tiny Llama (2 layers, GQA 4/2)
exported with `--kv static --max-context 256` (tests/tiny_models.py STATIC_MAX_CONTEXT_TINY).
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import onnx
import pytest

from kiln.engine import build_engine, load_profile, read_engine
from kiln.engine.builder import Backend
from kiln.engine.errors import EngineBuildError, ProfileError
from kiln.engine.kv_layout import kv_layout
from kiln.errors import ArtifactError
from kiln.manifests import newest_manifest

trt = pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")

PROFILE = "rtx-ampere-ada-fp16"
LAYERS, MAX_CONTEXT = 2, 256  # the tiny Llama; STATIC_MAX_CONTEXT_TINY
SM86, SM89 = 0x04, 0x08  # target bits at header offset 0x20 (docs/tensorrt-rtx/README.md)


def _fp32_profile():
    """The fp16 RTX profile's targets and shapes, for fp32 graphs (no shipped fp32 profile)."""
    return dataclasses.replace(load_profile(PROFILE), name="rtx-fp32-test", precision="fp32")


@pytest.fixture(scope="module")
def static_fp16(exported):
    return exported("llama", "fp16", kv="static")


@pytest.fixture(scope="module")
def static_engine(static_fp16, tmp_path_factory):
    return build_engine(static_fp16, PROFILE, tmp_path_factory.mktemp("static") / PROFILE)


def _parse(artifact, profile=PROFILE):
    backend = Backend(load_profile(profile) if isinstance(profile, str) else profile)
    return backend, backend.parse(artifact / "model.onnx")


def test_static_graph_parses_to_kv_cache_updates_and_attention(static_fp16):
    backend, net = _parse(static_fp16)
    types = net.layer_types()
    assert types["KV_CACHE_UPDATE"] == 2 * LAYERS  # one per K and V per layer
    assert types["ATTENTION_INPUT"] == types["ATTENTION_OUTPUT"] == LAYERS
    t = backend.trt
    updates = [x for x in net.layers() if x.type == t.LayerType.KV_CACHE_UPDATE]
    for layer in updates:
        layer.__class__ = t.IKVCacheUpdateLayer
        cache, out = layer.get_input(0), layer.get_output(0)
        # In place: the cache is the past input itself and the result is the present output.
        assert cache.is_network_input and out.is_network_output
        assert out.name == cache.name.replace("past_key_values.", "present.")
        assert layer.cache_mode == t.KVCacheMode.LINEAR
    present = {f"present.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")}
    assert {x.get_output(0).name for x in updates} == present


def test_concat_graph_has_no_kv_cache_update(exported):
    """Negative control: the concat layout's present is a Concat, never an in-place update."""
    _, net = _parse(exported("llama", "fp16"))
    assert "KV_CACHE_UPDATE" not in net.layer_types()


def test_static_engine_builds_for_both_rtx_targets(static_engine):
    plan = (static_engine / "engine.plan").read_bytes()
    assert plan[:4] == b"vtrt" and plan[0x20] == SM86 | SM89


def test_manifest_records_layout_slots_and_aliasing(static_engine):
    m = read_engine(static_engine)
    kv = m.kv_cache
    assert kv["layout"] == "static" and kv["max_context"] == MAX_CONTEXT
    assert kv["slots"] == {"min": 1, "max": 4}  # smallest max_batch (prefill 4, decode 8)
    assert kv["new_tokens"] == {"prefill": [1, 256], "decode": [1, 1]}  # prefill clipped to M
    assert kv["present_aliases_past"] is True
    assert kv["aliases"] == {
        f"present.{i}.{k}": f"past_key_values.{i}.{k}"
        for i in range(LAYERS)
        for k in ("key", "value")
    }
    assert m.build["layer_types"]["KV_CACHE_UPDATE"] == 2 * LAYERS
    prefill, decode = m.optimization_profiles
    past = prefill["tensors"]["past_key_values.0.key"]
    assert past["min"] == [1, 2, MAX_CONTEXT, 16] and past["max"] == [4, 2, MAX_CONTEXT, 16]
    assert prefill["tensors"]["input_ids"]["max"] == [4, 256]
    assert decode["tensors"]["input_ids"]["max"] == [4, 1]
    assert decode["tensors"]["write_index"] == {
        "mode": "input", "dtype": "int64", "min": [1], "opt": [1], "max": [4]
    }  # fmt: skip
    assert decode["tensors"]["present.1.value"]["max"] == [4, 2, MAX_CONTEXT, 16]
    # The runtime reads the slot length here too (runtime/artifact.py).
    assert all(p["axes"]["total_sequence"][2] == MAX_CONTEXT for p in m.optimization_profiles)


def test_fp32_static_engine_builds_with_decomposable_attention(exported, tmp_path):
    m = read_engine(build_engine(exported("llama", "fp32", kv="static"), _fp32_profile(), tmp_path))
    assert m.precision["label"] == "fp32"
    assert m.attention == {
        "layers": LAYERS,
        "decomposable": LAYERS,
        "why": "fp32 attention has no dedicated TensorRT-RTX kernel",
    }
    assert m.kv_cache["layout"] == "static"
    assert m.build["layer_types"]["KV_CACHE_UPDATE"] == 2 * LAYERS


def test_fp32_attention_without_decomposable_fails_to_build(exported):
    """Negative control for the decomposable fix: the same fp32 graph, built as parsed."""
    gpu = _fp32_profile()
    backend, net = _parse(exported("llama", "fp32", kv="static"), gpu)
    ranges = {"input_ids": ((1, 1), (1, 1), (4, 8)), "position_ids": ((1, 1), (1, 1), (4, 8))}
    ranges["write_index"] = ((1,), (1,), (4,))
    for t in net.inputs():
        if t.name.startswith("past_key_values."):
            ranges[t.name] = tuple((b, 2, MAX_CONTEXT, 16) for b in (1, 1, 4))
    cfg = backend.configure(net, gpu, [ranges])
    with pytest.raises(EngineBuildError, match="decomposable"):
        backend.build(net, cfg)


def test_static_artifact_longer_than_the_profile_is_refused(static_fp16, tmp_path):
    base = load_profile(PROFILE)
    short = dataclasses.replace(
        base,
        shapes=tuple(dataclasses.replace(s, max_context=128, opt_context=128) for s in base.shapes),
    )
    with pytest.raises(
        ProfileError,
        match=r"KV buffers hold max_context = 256 positions, but GPU profile "
        r"'rtx-ampere-ada-fp16' \[profile.prefill\] max_context = 128 .*"
        r"`kiln export --kv static --max-context 128`",
    ):
        build_engine(static_fp16, short, tmp_path / "eng")
    assert list(tmp_path.iterdir()) == []  # no engine, no staging folder


def test_static_graph_without_in_place_update_is_refused(static_fp16, tmp_path):
    """A past buffer written through a copy cannot alias present: the build must refuse it."""
    art = tmp_path / "art"
    shutil.copytree(static_fp16, art)
    model = onnx.load(str(art / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "TensorScatter")
    # present.0.key = Identity(past): the buffer is no longer written in place.
    node.op_type, node.input[:] = "Identity", [node.input[0]]
    del node.attribute[:]
    onnx.save(model, str(art / "model.onnx"))
    with pytest.raises(EngineBuildError, match=r"parsed to 3 in-place KV_CACHE_UPDATE .* not 4"):
        build_engine(art, PROFILE, tmp_path / "eng")


def test_layout_in_manifest_must_match_the_graph(static_fp16, tmp_path):
    io = json.loads((static_fp16 / "export.json").read_text())["io"]
    source = newest_manifest(static_fp16)
    assert kv_layout(source, io) == {"layout": "static", "max_context": MAX_CONTEXT}

    def claiming(kv_cache):
        return dataclasses.replace(
            source, export=dataclasses.replace(source.export, kv_cache=kv_cache)
        )

    with pytest.raises(ArtifactError, match=r"kv_cache.layout = 'concat', but .* static layout"):
        kv_layout(claiming({"layout": "concat"}), io)
    with pytest.raises(
        ArtifactError, match=r"max_context = 512, but the graph's KV buffers hold 256"
    ):
        kv_layout(claiming({"layout": "static", "max_context": 512}), io)
