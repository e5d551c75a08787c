"""Tiny models of every supported family (configs, seeded weights) and the tests' slot lengths.

Plain data and helpers that tests import by name (`from tiny_models import TINY_CONFIGS`; the
pytest config puts tests/ on the path); the fixtures that use them live in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as T

from kiln.models.shapes import QWEN25_05B, SMOLLM_135M

_COMMON = {"vocab_size": 300, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA_LIKE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    **_COMMON,
}

# One entry per family and per feature the export must preserve (see models/families.py).
# The export check points run to 13 tokens, so windows and RoPE switches below that are crossed.
TINY_CONFIGS: dict[str, Callable[[], Any]] = {
    "gpt2": lambda: T.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=256, **_COMMON),
    "llama": lambda: T.LlamaConfig(**_LLAMA_LIKE, tie_word_embeddings=False),
    "llama-tied-llama3": lambda: T.LlamaConfig(
        **_LLAMA_LIKE,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama-dynamic": lambda: T.LlamaConfig(
        **{**_LLAMA_LIKE, "max_position_embeddings": 8},
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    ),
    "mistral-window": lambda: T.MistralConfig(**_LLAMA_LIKE, sliding_window=8),
    "qwen2-yarn": lambda: T.Qwen2Config(
        **_LLAMA_LIKE,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen3": lambda: T.Qwen3Config(**_LLAMA_LIKE, head_dim=32, tie_word_embeddings=True),
    "phi3-longrope": lambda: T.Phi3Config(
        **{**_LLAMA_LIKE, "max_position_embeddings": 64},
        original_max_position_embeddings=8,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": [1.0] * 8,
            "long_factor": [3.0] * 8,
        },
    ),
}


# Real-scale shapes (tests/real_scale/): the layer count, widths and vocabulary of
# two published checkpoints, with seeded random weights. initializer_range sets the logit spread:
# at transformers' default 0.02 the logits of a deep random model are near zero (max |logit| < 1)
# and any fp32 check passes; at 0.1 max |logit| is 12 (SmolLM shape) and 16 (Qwen shape) on random
# prompts, logit std 2.4 and 3.0: the spread of a trained model.
REAL_SCALE_CONFIGS: dict[str, Callable[[], Any]] = {
    "smollm-135m": lambda: T.LlamaConfig(
        **SMOLLM_135M, initializer_range=0.1, bos_token_id=0, eos_token_id=0
    ),
    "qwen2.5-0.5b": lambda: T.Qwen2Config(
        **QWEN25_05B, initializer_range=0.1, bos_token_id=151643, eos_token_id=151643
    ),
}


# Slot length of static-layout exports in tests: within the tiny GPT-2's 256 positions, and
# room for the bundled model's whole text (337 tokens) in its 512.
STATIC_MAX_CONTEXT = {"zen": 384}
STATIC_MAX_CONTEXT_TINY = 256


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Build the named tiny (or real-scale) model with seeded random weights; save_pretrained it."""
    torch.manual_seed(seed)
    config = {**TINY_CONFIGS, **REAL_SCALE_CONFIGS}[name]()
    model = T.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    return folder


def perturb_norm_gain(proto: Any, consumer: int, *, index: int = 3, factor: float = 1.01) -> str:
    """Scale one element of the RMSNorm gain seen by one norm of an exported graph, in place.

    Every norm's gain starts as ones, so the exporter stores one initializer shared by all of
    them; the `consumer`-th node reading it (graph order: layer 0 input norm, layer 0
    post-attention norm, layer 1 ...) gets a private, perturbed copy. Returns the node's name.
    """
    import onnx

    shared = "model.model.layers.0.input_layernorm.weight"
    init = next(t for t in proto.graph.initializer if t.name == shared)
    node = [n for n in proto.graph.node if shared in n.input][consumer]
    w = onnx.numpy_helper.to_array(init).copy()
    w[index] *= factor
    name = f"{shared}.perturbed"
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    node.input[list(node.input).index(shared)] = name
    return str(node.name)
