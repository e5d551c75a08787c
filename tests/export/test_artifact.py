"""The export artifact: manifest contents, reuse when unchanged, atomic publication."""

from __future__ import annotations

import json
import logging
import re
import shutil

import onnx
import pytest
import torch
import transformers as T
from onnx.external_data_helper import uses_external_data

from kiln import parity
from kiln.errors import ParityError
from kiln.export import export_model


def _hidden(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_manifest_describes_the_export(exported):
    artifact = exported("gpt2")
    m = json.loads((artifact / "export.json").read_text())
    assert m["kind"] == "kiln.export"
    assert m["architecture"]["family"] == "gpt2" and m["config"]["tie_word_embeddings"]
    assert m["exporter"] == {
        "precision": "fp32",
        "opset": 18,
        "exporter": "torch.onnx dynamo",
        "kv": "concat",
    }
    assert m["kv_cache"]["layout"] == "concat"
    ins = {i["name"]: i for i in m["io"]["inputs"]}
    outs = {o["name"]: o for o in m["io"]["outputs"]}
    assert ins["input_ids"]["shape"] == ["batch", "sequence"]
    assert ins["attention_mask"]["shape"] == ["batch", "total_sequence"]
    assert ins["past_key_values.1.value"]["shape"] == ["batch", 4, "past_sequence", 16]
    assert outs["logits"]["shape"] == ["batch", "sequence", 300]
    assert outs["present.1.key"]["shape"] == ["batch", 4, "past_sequence + sequence", 16]
    assert len(ins) == 3 + 2 * 2 and len(outs) == 1 + 2 * 2
    assert m["versions"]["torch"].startswith("2.13.0")
    assert m["files"]["model.onnx"]["bytes"] == (artifact / "model.onnx").stat().st_size
    assert set(m["elapsed_s"]) >= {"load", "export", "check", "total"}
    assert len(m["source"]["sha256"]) == 64


def test_unchanged_input_is_reused_and_changed_input_rebuilds(tiny_model_dir, tmp_path, caplog):
    src = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), src)
    out = tmp_path / "out"
    export_model(src, out)
    first = json.loads((out / "export.json").read_text())

    with caplog.at_level(logging.INFO, logger="kiln"):
        export_model(src, out)
    assert "reusing it" in caplog.text
    assert json.loads((out / "export.json").read_text()) == first

    torch.manual_seed(1)  # new weights, same config: a different source hash
    T.AutoModelForCausalLM.from_config(T.AutoConfig.from_pretrained(src)).save_pretrained(src)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kiln"):
        export_model(src, out)
    assert "reusing it" not in caplog.text
    second = json.loads((out / "export.json").read_text())
    assert second["source"]["sha256"] != first["source"]["sha256"]
    assert second["parity"]["ok"]


def test_failed_export_leaves_nothing_and_keeps_the_old_artifact(
    tiny_model_dir, tmp_path, monkeypatch
):
    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    # An impossible tolerance makes the real parity check fail after a real export.
    monkeypatch.setitem(parity.TOL, "fp32", parity.Tol(atol=0.0, rtol=0.0))
    with pytest.raises(ParityError, match=r"atol .* would have passed"):
        export_model(src, out)
    assert not out.exists() and _hidden(tmp_path) == []

    monkeypatch.undo()
    export_model(src, out)
    before = (out / "export.json").read_text()
    monkeypatch.setitem(parity.TOL, "fp32", parity.Tol(atol=0.0, rtol=0.0))
    with pytest.raises(ParityError):
        export_model(src, out, force=True)
    assert (out / "export.json").read_text() == before and _hidden(tmp_path) == []

    kept = export_model(src, tmp_path / "drift", force=True, allow_drift=True)
    m = json.loads((kept / "export.json").read_text())
    assert m["parity"]["ok"] is False and m["parity"]["allowed_drift"] is True


def test_large_weights_go_to_external_data(tiny_model_dir, tmp_path, monkeypatch):
    """Past the protobuf limit weights move to model.onnx.data (threshold lowered to test it)."""
    import importlib

    tracing = importlib.import_module("kiln.export.onnx_from_hf")
    monkeypatch.setattr(tracing, "EXTERNAL_DATA_BYTES", 0)
    out = export_model(tiny_model_dir("llama"), tmp_path / "out")
    m = json.loads((out / "export.json").read_text())
    assert set(m["files"]) == {"model.onnx", "model.onnx.data"}
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    inline = [
        t.name for t in proto.graph.initializer if not uses_external_data(t) and t.ByteSize() > 1024
    ]
    assert inline == []  # folded constants too, not only the parameters
    assert m["files"]["model.onnx.data"]["bytes"] >= 0.95 * m["weight_bytes"]
    assert m["parity"]["ok"]  # ORT found the weights beside the graph after the rename


def test_a_folder_from_an_older_kiln_is_refused_with_the_fix(exported, tmp_path):
    """export.json without `format` (kiln before typed manifests): every reader names the fix."""
    from kiln.engine import build_engine
    from kiln.errors import ArtifactError
    from kiln.optimize import optimize_model
    from kiln.runtime.artifact import inspect_artifact

    old = tmp_path / "old"
    shutil.copytree(exported("llama"), old)
    assert inspect_artifact(old).kind == "onnx"  # negative control: the copy reads as it is
    m = json.loads((old / "export.json").read_text())
    m.pop("format")
    (old / "export.json").write_text(json.dumps(m))
    fix = re.escape(
        f"{old / 'export.json'} has format 1; this kiln reads format 2: re-run `kiln export`"
    )
    with pytest.raises(ArtifactError, match=fix):
        inspect_artifact(old)
    with pytest.raises(ArtifactError, match=fix):
        optimize_model(old, tmp_path / "opt")
    with pytest.raises(ArtifactError, match=fix):
        build_engine(old, "rtx-ampere-ada-fp16", tmp_path / "eng")
