"""Static-KV slots against PyTorch: prefill + 20 decode steps, logits and greedy tokens.

Each prompt's reference is transformers alone at batch 1 (its own cache), so a ragged prefill
that leaks between slots, a write at the wrong position, or a mask off by one shows up here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from kiln.parity import TOL, compare
from kiln.runtime import load
from kiln.runtime.slots import SlotFeed

FAMILIES = ["llama", "qwen3", "gpt2", "mistral-window"]
PROMPTS = [[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [1, 9], [1, 20, 30, 31, 32]]
STEPS = 20


def hf_reference(model_dir, prompt: list[int]) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits they were chosen from (prefill last + each decode step)."""
    model = T.AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=STEPS + 1,
            min_new_tokens=STEPS + 1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, torch.cat(out.logits).float().numpy()


def drive(backend, prompts: list[list[int]], refs: list[list[int]]) -> list[np.ndarray]:
    """Ragged prefill in one step, then STEPS decode steps fed the reference tokens."""
    got = [[] for _ in prompts]
    feeds = [SlotFeed(s, p, restart=True) for s, p in enumerate(prompts)]
    for i in range(STEPS + 1):
        for s, logits_V in enumerate(backend.step(feeds)):
            got[s].append(logits_V)
        feeds = [SlotFeed(s, [refs[s][i]]) for s in range(len(prompts))]
    return [np.stack(g) for g in got]


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_and_20_decode_steps_match_pytorch(name, exported, tiny_model_dir):
    art = exported(name, "fp32", kv="static")
    refs = [hf_reference(tiny_model_dir(name), p) for p in PROMPTS]
    gen = load(art, slots=3, tokenizer=False)
    logits = drive(gen.backend, PROMPTS, [t for t, _ in refs])
    for s, ((_, ref_logits), got) in enumerate(zip(refs, logits, strict=True)):
        diff = compare(f"{name} slot {s} logits", ref_logits, got, TOL["fp32"])
        assert diff.ok, diff.describe()
    # Greedy generation through the slot loop (fresh slots) equals transformers generate().
    done = gen.generate(PROMPTS, max_new_tokens=STEPS + 1, min_new_tokens=STEPS + 1)
    assert [c.token_ids for c in done] == [t for t, _ in refs]


def test_negative_control_lost_cache_fails_the_comparison(exported, tiny_model_dir):
    """Restarting a slot mid-run (its cache dropped) must break the logits comparison."""
    art = exported("llama", "fp32", kv="static")
    tokens, ref_logits = hf_reference(tiny_model_dir("llama"), PROMPTS[0])
    backend = load(art, slots=1, tokenizer=False).backend
    got = [backend.step([SlotFeed(0, PROMPTS[0], restart=True)])[0]]
    for i in range(STEPS):
        restart = i == 5  # the fault: slot 0 forgets its 16 cached positions
        got.append(backend.step([SlotFeed(0, [tokens[i]], restart=restart)])[0])
    diff = compare("llama lost cache", ref_logits, np.stack(got), TOL["fp32"])
    assert not diff.ok


def test_load_routes_static_artifacts_to_slots(exported):
    gen = load(exported("llama", "fp32", kv="static"), tokenizer=False, slots=2)
    assert type(gen.backend).__name__ == "OrtSlotBackend"
    assert gen.info.layout.name == "static"
    assert gen.backend.slots == 2
    assert gen.info.max_context == gen.backend.max_context == 256
