"""The bundled model still writes the Zen of Python through its optimized fp16 and int8 graphs."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from kiln.graph_io import stepper
from kiln.models.zen import ZEN_PROMPT, zen_text
from kiln.optimize.parity import decode_argmax


def _generate(artifact, n: int) -> str:
    tok = AutoTokenizer.from_pretrained(artifact)  # the artifact carries its tokenizer
    prompt = tok(ZEN_PROMPT)["input_ids"]
    ids = decode_argmax(stepper(artifact / "model.onnx"), prompt, n, None)
    if tok.eos_token_id in ids:
        ids = ids[: ids.index(tok.eos_token_id)]
    return ZEN_PROMPT + tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_zen_text_through_optimized_graph(optimized, precision):
    artifact = optimized("zen", precision)
    assert _generate(artifact, 400) == zen_text()
    parity = json.loads((artifact / "optimize.json").read_text())["parity"]
    assert parity["greedy_64"] >= 0.99


def test_a_broken_weight_breaks_the_text(optimized, tmp_path):  # negative control
    import shutil

    import onnx_ir as ir

    src = optimized("zen", "fp16")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    model = ir.load(bad / "model.onnx")
    w = max(model.graph.initializers.values(), key=lambda v: v.const_value.size)
    arr = w.const_value.numpy().copy()
    arr[: arr.shape[0] // 2] = 0
    w.const_value = ir.tensor(arr, name=w.name)
    ir.save(model, bad / "model.onnx")
    assert not zen_text().startswith(_generate(bad, 60))
