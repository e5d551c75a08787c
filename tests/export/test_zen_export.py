"""The bundled model's text survives export: greedy decoding over the ONNX reproduces it."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from kiln.models.zen import ZEN_PROMPT, zen_text
from kiln.runtime.greedy import greedy_from_onnx


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zen_text_through_onnx(exported, precision):
    artifact = exported("zen", precision)
    tok = AutoTokenizer.from_pretrained(artifact)  # the artifact carries its tokenizer
    prompt = tok(ZEN_PROMPT)["input_ids"]
    assert prompt[0] == tok.bos_token_id
    new = greedy_from_onnx(artifact, prompt, max_new_tokens=400, eos_id=tok.eos_token_id)
    text = ZEN_PROMPT + tok.decode(new, skip_special_tokens=True)
    assert text == zen_text()
    manifest = json.loads((artifact / "export.json").read_text())
    assert manifest["architecture"]["family"] == "llama"
    assert manifest["config"]["kv_heads"] < manifest["config"]["heads"]
