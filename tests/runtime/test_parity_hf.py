"""The decode loop reproduces transformers' greedy `generate()` token for token, every family.

Batch 1 and a ragged, left-padded batch of 3 whose rows finish at different steps; then the
cached loop against a full recompute every step. A loop that corrupts its cache must fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import TINY_CONFIGS
from transformers import AutoModelForCausalLM

from kiln.runtime import load

NEW = 14  # crosses the tiny configs' 8-token windows / RoPE switches with 6-token prompts
PROMPTS = [[1, 17, 42, 99, 7, 250], [1, 5, 64], [1, 200, 31, 77, 8, 9, 10, 11, 12]]


def _hf_greedy(model, prompts: list[list[int]], new: int, eos: int) -> list[list[int]]:
    """transformers' own generate(): left padding, HF positions, rows padded after EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


@pytest.fixture
def hf_models(tiny_model_dir):
    """A fresh model per call: NTK "dynamic" RoPE keeps grown frequencies between generate()
    calls (max_seq_len_cached), so a reused model would answer differently the second time."""

    def get(name):
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir(name)).eval()

    return get


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_greedy_equals_transformers_generate(name, exported, hf_models):
    gen = load(exported(name))
    eos = gen.info.eos_ids[0]
    # llama-dynamic's context is 16 (8 trained positions x NTK factor 2): stay inside it.
    new = min(NEW, gen.info.max_context - max(len(p) for p in PROMPTS))
    ref1 = _hf_greedy(hf_models(name), PROMPTS[:1], new, eos)
    got1 = gen.generate(PROMPTS[0], max_new_tokens=new)
    assert got1.token_ids == ref1[0], name

    if gen.info.manifest.rope["in_graph"]:
        # Length-dependent RoPE (dynamic, longrope): kiln's graph picks each row's frequencies
        # from its own length, so every row must equal transformers generating it alone (HF's
        # batched generate() switches on the batch-wide maximum instead).
        ref3 = [_hf_greedy(hf_models(name), [p], new, eos)[0] for p in PROMPTS]
    else:
        ref3 = _hf_greedy(hf_models(name), PROMPTS, new, eos)
    got3 = gen.generate(PROMPTS, max_new_tokens=new)
    assert [c.token_ids for c in got3] == ref3, name
    assert {c.finish_reason for c in got3} <= {"stop", "length"}


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_cache_equals_recompute(name, exported):
    gen = load(exported(name))
    cached = gen.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    recomputed = gen.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True, use_cache=False)
    rope = gen.info.manifest.rope["type"]
    if rope == "dynamic":
        # NTK frequencies change with every token past the trained length: a cache keeps keys
        # rotated with their own step's frequencies (as transformers' cache does), a recompute
        # re-rotates every key, so the two legitimately part after the switch. (longrope is
        # covered: the loop rebuilds its cache at the switch, so it must equal a recompute.)
        pytest.skip("dynamic RoPE: cached keys keep their step's frequencies by design")
    assert [c.token_ids for c in cached] == [c.token_ids for c in recomputed]


def test_eos_finishes_rows_on_their_own(exported):
    """Rows stop at their own EOS (made the 2nd/5th greedy token) while the others go on."""
    gen = load(exported("llama"))
    free = gen.generate(PROMPTS, max_new_tokens=NEW, ignore_eos=True)
    stops = (free[0].token_ids[1], free[2].token_ids[4])
    got = gen.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=stops, ignore_eos=True)
    for c, ref in zip(got, free, strict=True):
        cut = next((i for i, t in enumerate(ref.token_ids) if t in stops), None)
        expect = ref.token_ids if cut is None else ref.token_ids[: cut + 1]
        assert c.token_ids == expect
        assert c.finish_reason == ("length" if cut is None else "stop")
    assert len(got[0].token_ids) < NEW and len(got[2].token_ids) < NEW


def test_corrupted_cache_is_caught(exported, hf_models, monkeypatch):
    """Negative control: zeroing the cache after prefill must break agreement with HF."""
    gen = load(exported("llama"))
    backend = gen.backend.concat  # the concat graph under the slot adapter
    real = backend.forward
    calls = {"n": 0}

    def forward(ids, mask, pos, cache):
        logits = real(ids, mask, pos, cache)
        calls["n"] += 1
        if calls["n"] == 1:  # after prefill: drop every key/value the prompt wrote
            cache.past = [backend.stepper.ortvalue(np.zeros_like(v.numpy())) for v in cache.past]
        return logits

    monkeypatch.setattr(backend, "forward", forward)
    got = gen.generate(PROMPTS[0], max_new_tokens=NEW, ignore_eos=True)
    ref = _hf_greedy(hf_models("llama"), PROMPTS[:1], NEW, eos=-1)
    assert got.token_ids[0] == ref[0][0]  # the prefill itself is intact
    assert got.token_ids != ref[0]
