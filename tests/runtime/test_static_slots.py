"""Slot semantics of the static-KV backend: where K/V land, idle slots, refills, bad feeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as T

from kiln.errors import KilnError
from kiln.parity import TOL, compare
from kiln.runtime import decode, load
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.slots import SlotFeed

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 9], [1, 20, 30, 31]]


@pytest.fixture(scope="module")
def llama(exported, tiny_model_dir):
    return exported("llama", "fp32", kv="static"), tiny_model_dir("llama")


def hf_cache(model, tokens: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer (keys, values) [Hkv, L, D] of transformers' cache for one sequence alone."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]), use_cache=True)
    return [(la.keys[0].numpy(), la.values[0].numpy()) for la in out.past_key_values.layers]


def test_ragged_slots_write_at_their_positions(llama):
    """Read the buffers back after a ragged prefill and two steps with one slot idle."""
    art, hf_dir = llama
    model = T.AutoModelForCausalLM.from_pretrained(hf_dir)
    backend = load(art, slots=3, tokenizer=False).backend
    backend.step([SlotFeed(s, p, restart=True) for s, p in enumerate(PROMPTS)])
    seqs = [list(p) for p in PROMPTS]
    for tok in (40, 41):  # slot 1 idles while slots 0 and 2 decode
        backend.step([SlotFeed(0, [tok]), SlotFeed(2, [tok])])
        seqs[0].append(tok)
        seqs[2].append(tok)
    assert [backend.length(s) for s in range(3)] == [len(s) for s in seqs]
    for slot, seq in enumerate(seqs):
        for layer, (k, v) in enumerate(hf_cache(model, seq)):
            n = len(seq)
            for j, want in ((0, k), (1, v)):
                have = backend.read_slot(slot, 2 * layer + j)[:, :n]
                diff = compare(f"slot {slot} layer {layer} kv {j}", want, have, TOL["fp32"])
                assert diff.ok, diff.describe()


def test_idle_slots_are_not_touched(llama):
    """A step that does not feed a slot leaves its positions [0, length) bit-identical."""
    backend = load(llama[0], slots=4, tokenizer=False).backend
    backend.step([SlotFeed(s, p, restart=True) for s, p in enumerate(PROMPTS)])
    n = backend.length(1)
    before = [backend.read_slot(1, i)[:, :n] for i in range(4)]
    wide = list(range(3, 40))
    backend.step([SlotFeed(0, wide), SlotFeed(2, wide)])  # one call over slots 0..2, 1 idle
    backend.step([SlotFeed(0, [5]), SlotFeed(2, [6])])  # decode around it
    backend.step([SlotFeed(3, [1, 2, 3], restart=True)])  # a refill beyond it
    assert backend.length(1) == n
    for i in range(4):
        np.testing.assert_array_equal(backend.read_slot(1, i)[:, :n], before[i])
    # Negative control: feeding slot 1 does change its rows.
    backend.step([SlotFeed(1, [7, 7], restart=True)])
    assert not np.array_equal(backend.read_slot(1, 0)[:, :n], before[0])


def test_nearly_full_idle_slot_splits_the_step(llama):
    """An idle slot with no room for padding makes the step run per feed, not overflow it."""
    backend = load(llama[0], slots=3, tokenizer=False).backend
    backend.step([SlotFeed(1, [1] * 250, restart=True)])
    kept = backend.read_slot(1, 0)[:, :250]
    logits = backend.step([SlotFeed(0, PROMPTS[0], restart=True), SlotFeed(2, PROMPTS[0])])
    np.testing.assert_array_equal(backend.read_slot(1, 0)[:, :250], kept)
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)  # same prompt, same logits
    assert [backend.length(s) for s in range(3)] == [7, 250, 7]


def _seq(i: int, prompt: list[int], n: int) -> decode.Sequence:
    params = SamplingParams(max_new_tokens=n, min_new_tokens=n)
    return decode.Sequence(index=i, prompt_ids=prompt, params=params)


def test_refilled_slot_gives_the_same_tokens_as_a_fresh_run(llama):
    """Slot 0 finishes after 3 tokens and takes the waiting prompt while slot 1 decodes."""
    gen = load(llama[0], slots=2, tokenizer=False)
    rows = [_seq(0, PROMPTS[0], 3), _seq(1, PROMPTS[1], 16), _seq(2, PROMPTS[2], 12)]
    steps = list(decode.generate(gen.backend, rows))
    assert all(e.index != 2 for step in steps[:3] for e in step)  # prompt 2 waits 3 steps
    assert {e.index for e in steps[3]} == {1, 2}  # then prefills beside slot 1's decode
    fresh = load(llama[0], slots=1, tokenizer=False)
    for row in rows:
        alone = list(decode.generate(fresh.backend, [_seq(9, row.prompt_ids, len(row.out_ids))]))
        assert row.out_ids == [e[0].token_id for e in alone]


def test_more_prompts_than_slots_match_transformers(llama):
    art, hf_dir = llama
    model = T.AutoModelForCausalLM.from_pretrained(hf_dir)
    prompts = [*PROMPTS, [1, 3], [1, 7, 7, 7, 7, 7]]
    gen = load(art, slots=2, tokenizer=False)
    done = gen.generate(prompts, max_new_tokens=10, min_new_tokens=10)
    for p, c in zip(prompts, done, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10)
        assert c.token_ids == ref[0, len(p) :].tolist()


def test_no_cache_path_equals_cached(llama):
    gen = load(llama[0], slots=3, tokenizer=False)
    cached = gen.generate(PROMPTS, max_new_tokens=8, min_new_tokens=8)
    again = gen.generate(PROMPTS, max_new_tokens=8, min_new_tokens=8, use_cache=False)
    assert [c.token_ids for c in cached] == [c.token_ids for c in again]


@pytest.mark.parametrize(
    ("feeds", "match"),
    [
        ([SlotFeed(4, [1], restart=True)], "Slot 4 is out of range"),
        ([SlotFeed(-1, [1])], "Slot -1 is out of range"),
        ([SlotFeed(0, [], restart=True)], "Slot 0 is fed no tokens"),
        ([SlotFeed(1, [1] * 257, restart=True)], "Slot 1 holds 0 positions; 257 more"),
        ([SlotFeed(0, [2]), SlotFeed(0, [3])], "Slot 0 is fed twice"),
        ([SlotFeed(2, [1, 300], restart=True)], "token id 300 is outside the vocabulary"),
    ],
)
def test_bad_feeds_raise_before_touching_buffers(llama, feeds, match):
    backend = load(llama[0], slots=4, tokenizer=False).backend
    backend.step([SlotFeed(0, [1, 2, 3], restart=True)])
    before = backend.read_slot(0, 0)
    with pytest.raises(KilnError, match=match):
        backend.step([SlotFeed(3, [4], restart=True), *feeds])  # a good feed first
    assert [backend.length(s) for s in range(4)] == [3, 0, 0, 0]
    np.testing.assert_array_equal(backend.read_slot(0, 0), before)


def test_write_past_max_context_names_the_fix(llama):
    backend = load(llama[0], slots=1, tokenizer=False).backend
    backend.step([SlotFeed(0, [1] * 250, restart=True)])
    with pytest.raises(KilnError, match=r"Slot 0 holds 250 positions; 7 more .*--max-context"):
        backend.step([SlotFeed(0, [1] * 7)])
    backend.step([SlotFeed(0, [1] * 6)])  # exactly full is allowed
    assert backend.length(0) == 256


def test_prompt_longer_than_slot_is_refused(llama):
    gen = load(llama[0], slots=1, tokenizer=False)
    with pytest.raises(KilnError, match="does not fit this artifact's max context of 256"):
        gen.generate([1] * 256, max_new_tokens=2)


def test_concat_artifact_runs_over_slots_through_the_adapter(exported, llama):
    """load() runs a concat export over slots too (runtime/concat_slots.py), with the static
    export's tokens; the static slot backend itself still refuses a concat graph."""
    from kiln.runtime.ort_slots import OrtSlotBackend

    concat = exported("llama", "fp32")
    gen = load(concat, slots=2, tokenizer=False)
    assert type(gen.backend).__name__ == "ConcatSlotBackend" and gen.backend.slots == 2
    static = load(llama[0], slots=2, tokenizer=False)
    want = static.generate(PROMPTS, max_new_tokens=8, min_new_tokens=8)
    got = gen.generate(PROMPTS, max_new_tokens=8, min_new_tokens=8)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    with pytest.raises(KilnError, match=r"is a concat-KV graph \(no write_index input\)"):
        OrtSlotBackend(concat / "model.onnx", slots=1)
