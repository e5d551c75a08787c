"""Save a SmolLM-135M-shaped Llama with seeded random weights (for serving-memory checks).

30 layers, hidden 576, 9 heads, 3 KV heads, intermediate 1536, vocab 49152, tied embeddings,
as HuggingFaceTB/SmolLM-135M's config. The bundled model's tokenizer files go with it (their
ids are below the vocabulary), so the artifact serves text like a real checkpoint.
Usage: python .ci/smollm_shaped.py OUT_DIR (needs the export extra).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kiln.models.zen import ZEN_DIR


def main(out: Path) -> None:
    """Write config.json, model.safetensors, generation_config.json and tokenizer files."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(ZEN_DIR / name, out / name)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
