"""Real TensorRT-RTX builds of the bundled model on this CPU-only machine (no mocks)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata

import onnx
import pytest

from kiln.engine import build_engine, read_engine
from kiln.engine.errors import ParseError, ProfileError
from kiln.engine.profiles import profile_path
from kiln.errors import ArtifactError

trt = pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")

PROFILE = "rtx-ampere-ada-fp16"
# Target bits at header offset 0x20 (docs/tensorrt-rtx/README.md, "Engine inspection").
SM86, SM89 = 0x04, 0x08


@pytest.fixture(scope="module")
def zen_fp16(exported):
    return exported("zen", "fp16")


@pytest.fixture(scope="module")
def zen_engine(zen_fp16, tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / PROFILE
    return build_engine(zen_fp16, PROFILE, out)


def test_plan_is_a_tensorrt_rtx_engine_for_both_targets(zen_engine):
    plan = (zen_engine / "engine.plan").read_bytes()
    assert len(plan) > 1_000_000
    assert plan[:4] == b"vtrt"
    assert plan[0x20] == SM86 | SM89


def test_manifest_describes_the_engine(zen_engine, zen_fp16):
    m = read_engine(zen_engine)  # verifies the plan's size and sha256
    assert json.loads((zen_engine / "engine.json").read_text())["kind"] == "kiln.engine"
    onnx_bytes = (zen_fp16 / "model.onnx").read_bytes()
    assert m.source["onnx"]["model.onnx"]["sha256"] == hashlib.sha256(onnx_bytes).hexdigest()
    assert m.source["stage"] == "export"
    assert m.library == {"name": "tensorrt_rtx", "version": trt.__version__}
    assert m.compute_capabilities == ["8.6", "8.9"]
    assert m.profile["name"] == PROFILE and m.profile["precision"] == "fp16"
    assert m.precision["label"] == "fp16" and m.precision["quantized"] == {}
    plan = (zen_engine / "engine.plan").read_bytes()
    assert m.plan["bytes"] == len(plan)
    assert m.plan["sha256"] == hashlib.sha256(plan).hexdigest()
    times = m.build["elapsed_s"]
    assert 0 < times["build"] <= times["total"]
    assert m.build["versions"]["kiln"] == metadata.version("kiln")

    graph = onnx.load(str(zen_fp16 / "model.onnx"), load_external_data=False).graph
    names = [v.name for v in (*graph.input, *graph.output)]
    prefill, decode = m.optimization_profiles
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    for p in (prefill, decode):
        assert list(p["tensors"]) == names  # every I/O tensor, in ONNX order
    # The bundled model has 512 positions: the profile's 2048-token context is clipped to it.
    layers, kv, hd = 4, 2, 32
    assert len(names) == 3 + 2 * layers + 1 + 2 * layers
    t = prefill["tensors"]
    assert t["input_ids"] == {
        "mode": "input",
        "dtype": "int64",
        "min": [1, 1],
        "opt": [1, 128],
        "max": [4, 512],
    }
    assert t["past_key_values.0.key"]["max"] == [4, kv, 511, hd]
    assert t["logits"] == {
        "mode": "output",
        "dtype": "float16",
        "min": [1, 1, 384],
        "opt": [1, 128, 384],
        "max": [4, 512, 384],
    }
    d = decode["tensors"]
    assert d["input_ids"]["max"] == [8, 1]
    assert d["past_key_values.3.value"]["opt"] == [1, kv, 255, hd]
    assert d["present.3.value"] == {
        "mode": "output",
        "dtype": "float16",
        "min": [1, kv, 1, hd],
        "opt": [1, kv, 256, hd],
        "max": [8, kv, 512, hd],
    }


def test_engine_folder_carries_config_and_tokenizer(zen_engine, zen_fp16):
    """A serving host gets the plan's folder alone: config and tokenizer travel with it."""
    from transformers import AutoTokenizer

    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (zen_engine / name).read_bytes() == (zen_fp16 / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(zen_engine)
    assert tok.decode(tok("Beautiful is")["input_ids"], skip_special_tokens=True) == "Beautiful is"


def test_second_build_is_skipped(zen_engine, zen_fp16, caplog):
    before = os.stat(zen_engine / "engine.plan")
    with caplog.at_level(logging.INFO, logger="kiln"):
        build_engine(zen_fp16, PROFILE, zen_engine)
    after = os.stat(zen_engine / "engine.plan")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert "up to date" in caplog.text


def test_changed_onnx_or_profile_rebuilds(zen_fp16, zen_engine, tmp_path):
    first = read_engine(zen_engine)
    art = tmp_path / "art"
    shutil.copytree(zen_fp16, art)
    model = onnx.load(str(art / "model.onnx"))
    model.doc_string = "changed"  # same graph, different file: a new hash must rebuild
    onnx.save(model, str(art / "model.onnx"))
    out = tmp_path / "eng"
    shutil.copytree(zen_engine, out)
    build_engine(art, PROFILE, out)
    second = read_engine(out)
    assert second.source["onnx"] != first.source["onnx"]
    assert second.cache_key != first.cache_key
    assert second.plan["sha256"] != first.plan["sha256"]  # a new build (not byte-stable)

    profile = tmp_path / "sm89.toml"
    toml = profile_path(PROFILE).read_text().replace("max_batch = 8", "max_batch = 2")
    profile.write_text(
        toml.replace('compute_capabilities = ["8.6", "8.9"]', 'compute_capabilities = ["8.9"]')
    )
    build_engine(art, profile, out)
    third = read_engine(out)
    assert third.compute_capabilities == ["8.9"]
    assert third.optimization_profiles[1]["tensors"]["input_ids"]["max"] == [2, 1]
    assert (out / "engine.plan").read_bytes()[0x20] == SM89


def test_corrupt_onnx_is_rejected(zen_fp16, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(zen_fp16, art)
    data = (art / "model.onnx").read_bytes()
    (art / "model.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ParseError,
        match=r"cannot parse .*model.onnx:\n  the file: .*\n"
        r"    fix: the file is not a readable ONNX model",
    ):
        build_engine(art, PROFILE, tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


def test_unsupported_op_names_node_op_and_fix(zen_fp16, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(zen_fp16, art)
    model = onnx.load(str(art / "model.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "Softmax")
    node.op_type, node.domain, node.name = "GroupQueryAttention", "com.microsoft", "layer0_gqa"
    model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(art / "model.onnx"))
    with pytest.raises(
        ParseError,
        match=r"node 'layer0_gqa' \(op GroupQueryAttention\): .*\n"
        r"    fix: com.microsoft GroupQueryAttention has no TensorRT plugin: run `kiln optimize`",
    ):
        build_engine(art, PROFILE, tmp_path / "eng")


def test_precision_mismatch_names_both_and_the_fix(exported, tmp_path):
    with pytest.raises(
        ProfileError,
        match=r"is fp32 \(activations float32; no quantized tensors\), but GPU profile "
        r"'rtx-ampere-ada-fp16' builds fp16; .*`kiln export --precision fp16`.*"
        r"or pick a fp32 profile",
    ):
        build_engine(exported("llama", "fp32"), PROFILE, tmp_path / "eng")
    assert not (tmp_path / "eng").exists()


def test_folder_without_manifest_is_rejected(zen_fp16, tmp_path):
    art = tmp_path / "art"
    art.mkdir()
    shutil.copy(zen_fp16 / "model.onnx", art)
    with pytest.raises(ArtifactError, match=r"no export\.json or optimize\.json"):
        build_engine(art, PROFILE, tmp_path / "eng")


def test_killed_build_leaves_no_finished_engine(zen_fp16, tmp_path):
    out = tmp_path / "eng"
    code = (
        "from kiln.log import setup_logging; setup_logging(0)\n"
        "from kiln.engine import build_engine\n"
        f"build_engine({str(zen_fp16)!r}, {PROFILE!r}, {str(out)!r})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    seen = ""
    deadline = time.monotonic() + 60
    while "Building engine" not in seen and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen += line
    assert "Building engine" in seen, seen  # killed mid-build, not before it started
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # only a dot-named staging folder may remain
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert all(n.startswith(".eng.") and n.endswith(".tmp") for n in leftovers), leftovers
    assert not any((tmp_path / n / "engine.json").exists() for n in leftovers)
    build_engine(zen_fp16, PROFILE, out)  # and the next build completes
    assert json.loads((out / "engine.json").read_text())["plan"]["bytes"] > 0
