"""What kiln's bundled models share: the tokenizer recipe, the Llama shape and the atomic save.

models/train_zen.py (zen-llama) and models/train_eval.py (eval-llama) train different models on
different text, but both use a byte-level BPE that prepends BOS, a Llama described by a few
dimensions, and a save that never leaves a half-written model folder behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS = "<|bos|>", "<|endoftext|>"


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    max_positions: int,
    extra_special: Sequence[str] = (),
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it for `AutoTokenizer`.

    Byte-level pre-tokenizer and decoder make decode(encode(x)) == x for any string, newlines
    included. The post-processor prepends BOS, as Llama tokenizers do; EOS also pads.
    """
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, BOS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    extra = {} if chat_template is None else {"chat_template": chat_template}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=max_positions,
        **extra,
    )


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that tell the bundled Llamas apart."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int


def llama_config(tok: PreTrainedTokenizerFast, shape: LlamaShape) -> LlamaConfig:
    """A Llama of `shape` (SwiGLU, RMSNorm, RoPE, untied embeddings) over `tok`'s vocabulary."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        hidden_act="silu",
        max_position_embeddings=shape.max_positions,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def save_atomic(
    model: LlamaForCausalLM,
    tok: PreTrainedTokenizerFast,
    files: Mapping[str, str],
    out: Path,
) -> None:
    """Save model, tokenizer and the text `files` into a temp folder next to `out`, then rename.

    An interrupted run leaves only the hidden temp folder, never an `out` that looks finished.
    The generation config is greedy up to the model's whole context (the default of 20 tokens
    would cut a continuation short).
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        do_sample=False,
        max_length=model.config.max_position_embeddings,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    for name, text in files.items():
        (tmp / name).write_text(text)
    for f in tmp.iterdir():
        f.chmod(0o644)  # safetensors arrives as 0600; the folder is shipped and shared
    # A directory can't be os.replace()d onto a non-empty one: move the old one aside first.
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
