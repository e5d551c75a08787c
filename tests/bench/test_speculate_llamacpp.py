"""llama-server's /completion answer read the way bench/speculate_bench.py counts every runner.

The sample is a real answer (llama.cpp from the llama-cpp-python 0.3.36 sdist, llama-server
with the zen-llama F32 GGUF, `-md` its Q4_0, `--spec-draft-n-max 4`, a 5-id prompt, 12 tokens).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bench.speculate_llamacpp import parse_completion, runner_flags

SAMPLE: dict[str, Any] = {
    "index": 0,
    "content": " t373 t349J t338M t269 t278 t276 t353H t287\u000f",
    "tokens": [373, 349, 77, 338, 80, 269, 278, 276, 353, 75, 287, 18],
    "id_slot": 0,
    "stop": True,
    "tokens_predicted": 12,
    "tokens_evaluated": 5,
    "stop_type": "limit",
    "tokens_cached": 16,
    "timings": {
        "cache_n": 0,
        "prompt_n": 5,
        "prompt_ms": 1.28,
        "prompt_per_token_ms": 0.256,
        "prompt_per_second": 3906.25,
        "predicted_n": 12,
        "predicted_ms": 3.017,
        "predicted_per_token_ms": 0.2742727272727273,
        "predicted_per_second": 3646.005966191581,
        "draft_n": 8,
        "draft_n_accepted": 8,
    },
}


def test_figures_of_a_speculative_answer() -> None:
    c = parse_completion(SAMPLE, prompt_len=5, new=12)
    assert c.tokens == SAMPLE["tokens"]
    # kiln's definition, (tokens - 1) / (last - first), is the server's own figure
    assert c.tok_s == pytest.approx(SAMPLE["timings"]["predicted_per_second"], rel=1e-9)
    # 11 tokens after the first, 8 of them accepted drafts: 3 target passes
    assert (c.drafted, c.accepted, c.passes) == (8, 8, 3)


def test_a_plain_answer_has_no_draft_fields() -> None:
    plain = copy.deepcopy(SAMPLE)
    del plain["timings"]["draft_n"], plain["timings"]["draft_n_accepted"]
    c = parse_completion(plain, prompt_len=5, new=12)
    assert (c.drafted, c.accepted, c.passes) == (0, 0, 11)


@pytest.mark.parametrize(
    ("change", "prompt_len", "new", "says"),
    [
        ({}, 6, 12, "not the 6 sent"),  # the server added a BOS, or dropped a token
        ({"cache_n": 2, "prompt_n": 3}, 5, 12, "cached"),  # a reused prefix: not a cold run
        ({}, 5, 16, "not 16"),  # stopped early (EOS not ignored)
    ],
)
def test_a_run_that_is_not_the_one_asked_is_refused(
    change: dict[str, int], prompt_len: int, new: int, says: str
) -> None:
    body = copy.deepcopy(SAMPLE)
    body["timings"].update(change)
    with pytest.raises(ValueError, match=says):
        parse_completion(body, prompt_len=prompt_len, new=new)


def test_an_answer_without_timings_is_refused() -> None:
    with pytest.raises(ValueError, match="no timings"):
        parse_completion({"content": "x"}, prompt_len=5, new=12)


def test_runner_flags_carry_k_and_the_draft() -> None:
    flags = runner_flags([4, 8], 3, Path("d.gguf"), 5)
    assert list(flags) == [
        "llama.cpp plain", "llama.cpp ngram k=4", "llama.cpp ngram k=8", "llama.cpp Q4_0 draft k=5"
    ]  # fmt: skip
    assert flags["llama.cpp plain"][1] == []
    ngram = flags["llama.cpp ngram k=8"][1]
    assert ngram[ngram.index("--spec-ngram-simple-size-m") + 1] == "8"
    assert ngram[ngram.index("--spec-ngram-simple-size-n") + 1] == "3"
    draft = flags["llama.cpp Q4_0 draft k=5"][1]
    assert draft[draft.index("-md") + 1] == "d.gguf"
    assert draft[draft.index("--spec-draft-n-max") + 1] == "5"
    assert "llama.cpp Q4_0 draft k=5" not in runner_flags([4], 3, None, 5)
