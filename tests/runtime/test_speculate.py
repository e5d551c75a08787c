"""Speculative decoding gives plain decoding's tokens, greedy and seeded, in fewer target passes.

The reference is the plain slot loop on the same artifact (runtime/decode.py without a
speculator); every comparison is token-exact. Negative controls: a verify step that does not
roll the slot back over rejected drafts, and one that keeps every draft, must both change the
output.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.models.zen import ZEN_PROMPT, zen_text
from kiln.runtime import Generator, load
from kiln.runtime.speculate import (
    DraftModelDrafter,
    NgramDrafter,
    Speculator,
    load_speculator,
    ngram_draft,
)


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts, half of them with a repeated span (so n-gram drafts get accepted)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        body = [int(t) for t in rng.integers(3, 300, size=int(rng.integers(2, 30)))]
        out.append([1, *body, *body[: len(body) // 2]] if i % 2 else [1, *body])
    return out


def run(
    gen: Generator, spec: Speculator | None, ps: list[list[int]], **kw: object
) -> list[list[int]]:
    gen.speculator = spec
    try:
        return [c.token_ids for c in gen.generate(ps, **kw)]
    finally:
        gen.speculator = None


@pytest.fixture(scope="module")
def llama(exported) -> Generator:
    return load(exported("llama", "fp32", kv="static"), slots=3, tokenizer=False, last_only=False)


def test_ngram_draft_takes_the_latest_match_of_the_longest_ngram():
    assert ngram_draft([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 2) == [7, 8]  # latest "1 2 3"
    assert ngram_draft([5, 2, 3, 9, 4, 2, 3], 3) == [9, 4, 2]  # "2 3" (no "4 2 3" before)
    assert ngram_draft([5, 6, 7, 8], 3) == []  # negative control: no earlier occurrence
    assert ngram_draft([1, 2, 1], 0) == []
    assert ngram_draft([4, 4], 5) == [4]  # a match at the end drafts what is left
    # a repeating run: the latest match with k tokens after it, not the one just before the end
    assert ngram_draft([3, 7, 7, 7, 7, 7, 7], 3) == [7, 7, 7]
    assert ngram_draft([1, 2, 1, 2, 1, 2, 1], 4) == [2, 1, 2, 1]


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_ngram_matches_plain_decoding(llama, k):
    ps = prompts(12)
    plain = run(llama, None, ps, max_new_tokens=40, ignore_eos=True)
    spec = Speculator(NgramDrafter(), draft_tokens=k)
    assert run(llama, spec, ps, max_new_tokens=40, ignore_eos=True) == plain
    st = spec.stats
    assert st.accepted > 0 and st.drafted > st.accepted  # both paths of the verify step ran
    assert st.tokens_per_pass > 1.0
    assert st.emitted == sum(len(t) for t in plain) - len(ps)  # the first token is the prompt's


def test_seeded_sampling_draws_the_same_tokens(llama):
    """Same seed, same draws in the same order: token-identical to plain sampling."""
    ps = prompts(8, seed=1)
    kw = dict(max_new_tokens=40, temperature=0.3, top_p=0.9, top_k=20, ignore_eos=True)
    for seed in (0, 11, 2**40):
        plain = run(llama, None, ps, seed=seed, **kw)
        spec = Speculator(NgramDrafter(), draft_tokens=4)
        assert run(llama, spec, ps, seed=seed, **kw) == plain
        assert spec.stats.accepted > 0
    other = run(llama, None, ps, seed=12, **kw)
    assert other != plain  # the seed decides the tokens (the comparison above can fail)


def test_stops_and_the_end_of_the_slot_are_respected(llama):
    """EOS, min_new_tokens and a prompt that fills the slot but for a few positions."""
    near_end = [1, *([7, 8, 9] * 83)]  # 250 of 256 positions
    ps = [near_end, *prompts(4, seed=2)]
    for kw in (
        dict(max_new_tokens=200, ignore_eos=True),  # the first row ends at the slot's end
        dict(max_new_tokens=60, min_new_tokens=5, stop_token_ids=(7, 11, 40)),
    ):
        plain = llama.generate(ps, **kw)
        llama.speculator = Speculator(NgramDrafter(), draft_tokens=6)
        try:
            spec = llama.generate(ps, **kw)
        finally:
            llama.speculator = None
        assert [(c.token_ids, c.finish_reason) for c in spec] == [
            (c.token_ids, c.finish_reason) for c in plain
        ]
        if kw.get("ignore_eos"):
            assert (len(spec[0].token_ids), spec[0].finish_reason) == (6, "length")


class KeepStaleRows(Speculator):
    """Negative control: leaves the rejected drafts in the slot (no rollback)."""

    def verify(self, backend, feed, seq, logits_SV):  # type: ignore[no-untyped-def]
        truncate, backend.truncate = backend.truncate, lambda slot, length: None
        try:
            return super().verify(backend, feed, seq, logits_SV)
        finally:
            del backend.truncate
            assert backend.truncate == truncate


def test_negative_controls_change_the_output(llama):
    ps = prompts(12)
    plain = run(llama, None, ps, max_new_tokens=40, ignore_eos=True)
    assert (
        run(llama, KeepStaleRows(NgramDrafter()), ps, max_new_tokens=40, ignore_eos=True) != plain
    )


def test_draft_model_verify_matches_plain(llama, exported):
    """A draft artifact of the same vocabulary: itself (all accepted) and another model."""
    ps = prompts(8, seed=3)
    plain = run(llama, None, ps, max_new_tokens=30, ignore_eos=True)
    for name in ("llama", "qwen3"):
        draft = load(exported(name, "fp32", kv="static"), slots=3, tokenizer=False, last_only=False)
        spec = Speculator(DraftModelDrafter(draft.backend), draft_tokens=4)
        assert run(llama, spec, ps, max_new_tokens=30, ignore_eos=True) == plain
        if name == "llama":
            assert spec.stats.acceptance_rate == 1.0 and spec.stats.tokens_per_pass > 4
        else:
            assert spec.stats.acceptance_rate < 0.5  # another model's guesses are often wrong
    kw = dict(max_new_tokens=30, temperature=0.8, seed=5, ignore_eos=True)
    spec = Speculator(DraftModelDrafter(draft.backend), draft_tokens=3)
    assert run(llama, spec, ps, **kw) == run(llama, None, ps, **kw)


def test_zen_grounded_prompt_matches_and_accepts(exported):
    """The bundled model quoting its text: identical text and stop, most drafts accepted."""
    art = exported("zen", "fp32", kv="static")
    gen = load(art, slots=2, last_only=False)
    text = zen_text()
    ps = [text[:700] + "\n" + text[:40], ZEN_PROMPT, text[:120]]  # the first starts over
    plain = gen.generate(ps, max_new_tokens=120, stop=["Namespaces"])
    gen.speculator = load_speculator(gen, "ngram", draft_tokens=5)
    spec = gen.generate(ps, max_new_tokens=120, stop=["Namespaces"])
    assert [(c.text, c.finish_reason) for c in spec] == [(c.text, c.finish_reason) for c in plain]
    assert gen.speculator.stats.tokens_per_pass > 1.2  # 1.32 here; plain decoding is 1.0


def test_bad_speculation_settings_are_refused(exported, tmp_path):
    gen = load(exported("llama", "fp32", kv="static"), slots=1, tokenizer=False, last_only=False)
    with pytest.raises(KilnError, match="draft_tokens=0"):
        Speculator(NgramDrafter(), draft_tokens=0)
    with pytest.raises(KilnError, match="neither 'ngram' nor an artifact folder"):
        load_speculator(gen, str(tmp_path / "missing"))
    with pytest.raises(KilnError, match="does not share the target's tokenizer"):
        load_speculator(gen, str(exported("zen", "fp32", kv="static")))
    concat = load(exported("llama"), slots=1, tokenizer=False)
    with pytest.raises(KilnError, match="--kv static"):
        load_speculator(concat, "ngram")
    with pytest.raises(KilnError, match="--kv static"):
        concat.backend.truncate(0, 0)  # type: ignore[attr-defined]


def test_kiln_generate_speculate_prints_the_plain_text_and_the_metrics(exported, capsys):
    from kiln.cli import main

    art = str(exported("zen", "fp32", kv="static"))
    args = ["generate", art, "--prompt", ZEN_PROMPT, "--max-new-tokens", "60"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculate", "ngram", "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain
    assert "tokens per verify pass" in out.err and "acceptance" in out.err
    assert main([*args, "--speculate", "nonsense"]) == 1  # a KilnError: exit 1, no traceback
    assert "neither 'ngram' nor an artifact folder" in capsys.readouterr().err
