"""The static KV layout: slot buffers written in place, each slot with its own length."""

from __future__ import annotations

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from kiln.errors import ConfigError
from kiln.export import export_model
from kiln.graph_io import ort_session
from kiln.layouts import STATIC
from kiln.models.zen import ZEN_PROMPT, zen_text
from kiln.parity import TOL

FAMILIES = ["llama", "gpt2", "mistral-window", "qwen3", "phi3-longrope"]


@pytest.mark.parametrize("name", FAMILIES)
def test_static_export_matches_pytorch(exported, name):
    """Ragged prefill, 20 decode steps and a slot refilled mid-run, each slot vs PyTorch alone."""
    m = json.loads((exported(name, kv="static") / "export.json").read_text())
    parity = m["parity"]
    assert parity["ok"] and parity["logits_max_abs"] <= TOL["fp32"].atol
    assert len(parity["steps"]) == 21
    assert parity["steps"][0]["tokens"] == [7, 4, 9]  # ragged prefill, right padded
    refill = parity["steps"][11]
    assert refill["tokens"][1] == 5 and refill["write_index"][1] == 0  # slot 1 restarted
    assert refill["write_index"][0] > 0 and refill["write_index"][2] > 0  # others kept going
    assert m["kv_cache"]["layout"] == "static" and m["exporter"]["opset"] == 24
    past = next(i for i in m["io"]["inputs"] if i["name"] == "past_key_values.0.key")
    assert past["shape"][2] == m["kv_cache"]["max_context"]
    assert [i["name"] for i in m["io"]["inputs"][:3]] == [
        "input_ids",
        "position_ids",
        "write_index",
    ]


def _run(sess, layers, ids, index, buffers):
    pos = index[:, None] + np.arange(ids.shape[1])[None, :]
    feeds = dict(zip(STATIC.input_names(layers), [ids, pos, index, *buffers], strict=True))
    logits, *present = sess.run(None, feeds)
    return logits, present


def test_mask_hides_unwritten_positions_and_sees_written_ones(exported):
    artifact = exported("llama", kv="static")
    m = json.loads((artifact / "export.json").read_text())
    cfg, n = m["config"], m["kv_cache"]["max_context"]
    sess = ort_session(artifact / "model.onnx")
    rng = np.random.default_rng(0)
    shape = (2, cfg["kv_heads"], n, cfg["head_dim"])
    zeros = [np.zeros(shape, np.float32) for _ in range(2 * cfg["layers"])]
    noise = [rng.standard_normal(shape).astype(np.float32) for _ in range(2 * cfg["layers"])]
    ids = rng.integers(0, cfg["vocab"], size=(2, 5))
    index = np.array([0, 0])
    clean, present = _run(sess, cfg["layers"], ids, index, zeros)
    noisy, _ = _run(sess, cfg["layers"], ids, index, noise)
    np.testing.assert_allclose(noisy, clean, atol=1e-6)  # garbage past the write is never read

    nxt = rng.integers(0, cfg["vocab"], size=(2, 1))
    step, _ = _run(sess, cfg["layers"], nxt, np.array([5, 5]), present)
    corrupted = [p.copy() for p in present]
    corrupted[0][:, :, 3] += 1.0  # a key the slot did write
    bad, _ = _run(sess, cfg["layers"], nxt, np.array([5, 5]), corrupted)
    assert np.abs(bad - step).max() > 1e-3  # negative control: written positions are read


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zen_text_through_static_slots(exported, precision):
    """The bundled model reproduces its text decoding in slot 1 while slot 0 decodes another."""
    artifact = exported("zen", precision, kv="static")
    m = json.loads((artifact / "export.json").read_text())
    cfg, n = m["config"], m["kv_cache"]["max_context"]
    tok = AutoTokenizer.from_pretrained(artifact)
    sess = ort_session(artifact / "model.onnx")
    dtype = np.float16 if precision == "fp16" else np.float32
    buffers = [np.zeros((2, cfg["kv_heads"], n, cfg["head_dim"]), dtype)] * (2 * cfg["layers"])
    prompts = [tok("Errors should")["input_ids"], tok(ZEN_PROMPT)["input_ids"]]
    width = max(map(len, prompts))
    ids = np.array([p + [0] * (width - len(p)) for p in prompts])  # right padding
    logits, buffers = _run(sess, cfg["layers"], ids, np.array([0, 0]), buffers)
    nxt = [int(np.argmax(logits[r, len(p) - 1])) for r, p in enumerate(prompts)]
    length = [len(p) for p in prompts]
    out: list[int] = []
    while nxt[1] != tok.eos_token_id and length[1] < n - 1:
        out.append(nxt[1])
        logits, buffers = _run(
            sess, cfg["layers"], np.array([[t] for t in nxt]), np.array(length), buffers
        )
        length = [x + 1 for x in length]
        nxt = [int(np.argmax(logits[r, 0])) for r in range(2)]
    assert ZEN_PROMPT + tok.decode(out, skip_special_tokens=True) == zen_text()


def test_static_layout_bad_options(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    with pytest.raises(ConfigError, match=r"--kv static needs --max-context N with N >= 32"):
        export_model(src, tmp_path / "a", kv="static")
    with pytest.raises(ConfigError, match=r"--max-context applies to --kv static only"):
        export_model(src, tmp_path / "b", max_context=128)
    with pytest.raises(ConfigError, match=r"needs opset >= 24 \(TensorScatter\), got 18"):
        export_model(src, tmp_path / "c", kv="static", max_context=64, opset=18)
    with pytest.raises(ConfigError, match=r"not a cache layout"):
        export_model(src, tmp_path / "d", kv="paged")
    with pytest.raises(ConfigError, match=r"exceeds the model's max_position_embeddings 256"):
        export_model(tiny_model_dir("gpt2"), tmp_path / "e", kv="static", max_context=512)
    assert not any(tmp_path.iterdir())


def test_static_check_catches_skipped_kv_writes(exported, tiny_model_dir, tmp_path):
    """Negative control: a graph whose TensorScatter writes are dropped fails the parity check."""
    import onnx

    from kiln.export.check import check_parity
    from kiln.export.source import describe_source, load_model

    proto = onnx.load(str(exported("llama", kv="static") / "model.onnx"))
    writes = [n for n in proto.graph.node if n.op_type == "TensorScatter"]
    assert writes
    for node in writes:  # present = past: the new keys and values are never written
        node.op_type = "Identity"
        del node.input[1:]
        del node.attribute[:]
    onnx.save(proto, str(tmp_path / "unwritten.onnx"))
    src = describe_source(tiny_model_dir("llama"))
    model = load_model(src.path)
    report, _ = check_parity(tmp_path / "unwritten.onnx", model, src.family.shape(model.config))
    assert not report.ok
