"""The shapes of published checkpoints, for models built with seeded random weights.

No hub here: tests (tests/real_scale/) and benchmarks (bench/race.py, bench/loadtest.py) build
these shapes from a transformers config class and save them. Each caller adds what it varies
(initializer_range, token ids).
"""

from __future__ import annotations

from typing import Any

SMOLLM_135M: dict[str, Any] = {  # HuggingFaceTB/SmolLM-135M config.json
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
QWEN25_05B: dict[str, Any] = {  # Qwen/Qwen2.5-0.5B config.json
    "num_hidden_layers": 24,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
}
