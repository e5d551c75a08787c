"""Fusions on tiny models of every supported architecture: what matched, and parity kept.

fp32 graphs with every fusion (attention included) are checked against PyTorch with the fp32
budget (1e-4): optimize_model raises past it, and the manifest must say the same.
"""

from __future__ import annotations

import json

import onnx
import pytest
from tiny_models import TINY_CONFIGS

from kiln.optimize.passes import CLEANUP, FUSIONS

ALL_FUSIONS = (*CLEANUP, *FUSIONS, "cse", "remove-unused")

# What each family's fp32 export fuses to (2 layers; RMS: 2 per layer + final; q/k norms in qwen3).
EXPECTED = {
    "gpt2": {"Gelu": 2, "Attention": 2, "LayerNormalization": 5},
    "llama": {"RMSNormalization": 5, "RotaryEmbedding": 4, "Attention": 2},
    "qwen3": {"RMSNormalization": 9, "RotaryEmbedding": 4, "Attention": 2},
}


def _expected(name: str) -> dict[str, int]:
    return EXPECTED.get(name, EXPECTED["llama"])  # the other families are Llama-like


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_fusions_match_and_keep_fp32_parity(optimized, name):
    out = optimized(name, "fp32", ALL_FUSIONS)
    manifest = json.loads((out / "optimize.json").read_text())
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    for op, count in _expected(name).items():
        assert ops.count(op) == count, (op, manifest["passes"])
    assert "Softmax" not in ops and "IsNaN" not in ops  # sdpa fully replaced
    torch = manifest["parity"]["torch"]
    assert torch["ok"] and torch["logits_max_abs"] <= 1e-4, torch
    assert manifest["parity"]["greedy_64"] == 1.0
    assert manifest["engine_hints"]["attention_decomposable"] is True  # fp32 IAttention


def test_fusions_hold_on_an_fp16_export(optimized):
    """HF casts RMSNorm input and the RoPE tables in fp16 models; the rules accept the casts."""
    from trt_build import build

    out = optimized("llama", "fp16", None, "fp16")
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    for op, count in EXPECTED["llama"].items():
        assert ops.count(op) == count, op
    assert json.loads((out / "optimize.json").read_text())["parity"]["torch"]["ok"]
    result = build(out / "model.onnx")
    assert result["ok"], result["errors"]
    assert result["types"]["ROTARY_EMBEDDING"] == 4 and result["types"]["ATTENTION_OUTPUT"] == 2
