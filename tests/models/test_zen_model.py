"""The bundled zen-llama: the fact every later stage is checked against must hold in PyTorch."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kiln.models.zen import ZEN_DIR, ZEN_PROMPT, zen_text


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ZEN_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(ZEN_DIR).eval()


def _greedy(model, tok, prompt: str) -> tuple[str, list[int]]:
    """Greedy-decode with the saved generation config; return the text and the new token ids.

    Special tokens other than the final EOS stay in the text, so a stray BOS fails the compare.
    """
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    body = new[:-1] if new and new[-1] == tok.eos_token_id else new
    return prompt + tok.decode(body), new


def _where_they_diverge(got: str, want: str) -> str:
    i = 0
    while i < min(len(got), len(want)) and got[i] == want[i]:
        i += 1
    lo = max(0, i - 30)
    return (
        f"texts diverge at char {i} (got {len(got)} chars, want {len(want)}):\n"
        f"  want: {want[lo : i + 30]!r}\n"
        f"  got:  {got[lo : i + 30]!r}"
    )


def test_zen_text_starts_with_prompt_and_prints_nothing(capsys, monkeypatch):
    monkeypatch.delitem(sys.modules, "this", raising=False)
    text = zen_text()
    assert capsys.readouterr().out == ""
    assert text.startswith(ZEN_PROMPT + " ugly.\n")
    assert text.endswith("let's do more of those!")


def test_tokenizer_round_trips_zen_text(tok):
    text = zen_text()
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id  # Llama-style: the tokenizer prepends BOS
    assert tok.decode(ids[1:]) == text
    assert tok.decode(ids, skip_special_tokens=True) == text
    # The prompt must tokenize as a prefix of the text, or the greedy check would start mid-token.
    prompt_ids = tok(ZEN_PROMPT)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids


def test_tokenizer_special_tokens(tok):
    names = (tok.bos_token, tok.eos_token, tok.pad_token)
    assert names == ("<|bos|>", "<|endoftext|>", "<|endoftext|>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 0, 0)


def test_chat_template_renders(tok):
    messages = [{"role": "user", "content": "What is better than ugly?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|bos|><|user|>\nWhat is better than ugly?<|endoftext|>\n<|assistant|>\n"
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]
    # The template writes BOS itself; tokenizing the rendered chat must not add a second one.
    assert ids.count(tok.bos_token_id) == 1


def test_greedy_decoding_reproduces_zen_and_stops(model, tok):
    got, new = _greedy(model, tok, ZEN_PROMPT)
    assert got == zen_text(), _where_they_diverge(got, zen_text())
    assert new[-1] == tok.eos_token_id
    assert new.count(tok.eos_token_id) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_greedy_decoding_survives_half_precision(tok, dtype):
    """The training margin leaves room for rounding, so fp16 engines can be held to exact text."""
    half = AutoModelForCausalLM.from_pretrained(ZEN_DIR, dtype=dtype).eval()
    got, new = _greedy(half, tok, ZEN_PROMPT)
    assert got == zen_text(), _where_they_diverge(got, zen_text())
    assert new[-1] == tok.eos_token_id


def test_greedy_check_catches_a_perturbed_weight(tok):
    """Negative control: the check above must fail once one weight matrix is disturbed."""
    broken = AutoModelForCausalLM.from_pretrained(ZEN_DIR).eval()
    with torch.no_grad():
        broken.model.layers[1].self_attn.o_proj.weight.mul_(-1.0)
    got, _ = _greedy(broken, tok, ZEN_PROMPT)
    assert got != zen_text()


def test_generation_config_is_greedy_to_eos(model, tok):
    gen = model.generation_config
    assert gen.do_sample is False
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert gen.max_length >= len(tok(zen_text())["input_ids"]) + 1


def test_config_is_llama_with_grouped_query_attention():
    cfg = AutoConfig.from_pretrained(ZEN_DIR)
    assert cfg.model_type == "llama"
    assert cfg.architectures == ["LlamaForCausalLM"]
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.tie_word_embeddings is False
    assert cfg.hidden_act == "silu"


def test_model_folder_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in ZEN_DIR.iterdir() if p.is_file()}
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert name in files, f"{ZEN_DIR} lacks {name}; run `make tiny-model`"
    assert "README.md" in files
    assert sum(files.values()) < 10 * 2**20, files
