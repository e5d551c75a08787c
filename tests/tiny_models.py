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


# Slot length of static-layout exports in tests: within the tiny GPT-2's 256 positions, and
# room for the bundled model's whole text (337 tokens) in its 512.
STATIC_MAX_CONTEXT = {"zen": 384}
STATIC_MAX_CONTEXT_TINY = 256


def save_tiny(name: str, folder: Path, seed: int = 0) -> Path:
    """Build the named tiny model with seeded random weights and save_pretrained it to `folder`."""
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(TINY_CONFIGS[name]())
    model.save_pretrained(folder)
    return folder
