"""`choose_all` picks the same tokens as choosing row by row; only plain greedy rows batch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kiln.runtime import SamplingParams
from kiln.runtime.decode import Sequence, choose_all, plain_greedy

PARAMS = [
    SamplingParams(),  # greedy
    SamplingParams(temperature=0.8, seed=3),
    SamplingParams(top_k=1, temperature=1.5),  # greedy by top_k
    SamplingParams(repetition_penalty=1.3),  # greedy, but the penalty changes the argmax
    SamplingParams(min_new_tokens=5, stop_token_ids=(7,)),  # EOS suppressed: not plain
    SamplingParams(max_new_tokens=9, stop=("x",), seed=11, ignore_eos=True),  # plain greedy
    SamplingParams(temperature=1.0, top_p=0.5, seed=5),
]


def _rows() -> tuple[list[Sequence], np.ndarray]:
    seqs = [Sequence(i, [1, 7, 42], p, eos_ids=(2,)) for i, p in enumerate(PARAMS)]
    logits = np.random.default_rng(0).normal(size=(len(seqs), 64)).astype(np.float32)
    logits[:, 7] = logits.max() + 2  # a seen stop token leads: min_new_tokens pushes it out
    logits[:, 50] = logits[:, 7] - 0.3  # an unseen one second: the penalty reorders
    return seqs, logits


def test_choose_all_equals_row_by_row():
    seqs, logits = _rows()
    want = [seq.choose(row) for seq, row in zip(seqs, logits, strict=True)]
    seqs2, _ = _rows()  # fresh samplers: the same seeds draw again
    assert choose_all(seqs2, logits) == want
    assert want[3] != int(np.argmax(logits[3]))  # negative control: the penalty mattered
    assert want[4] != 7  # negative control: the suppression mattered


def test_plain_greedy_only_for_argmax_rows():
    seqs, _ = _rows()
    assert [plain_greedy(s) for s in seqs] == [True, False, True, False, False, True, False]


@pytest.mark.parametrize("field", ["repetition_penalty", "top_p"])
def test_a_changed_choosing_field_leaves_the_shortcut(field):
    value = {"repetition_penalty": 1.1, "top_p": 0.9}[field]
    seq = Sequence(0, [1], dataclasses.replace(SamplingParams(), **{field: value}))
    assert plain_greedy(Sequence(0, [1], SamplingParams()))
    assert not plain_greedy(seq)


@pytest.mark.parametrize("vocab", [49152, 49152 - 7, 1000])
def test_tempered_rows_batch_and_equal_row_by_row(vocab):
    """Temperature-only rows are warped as one array; every draw equals `Sequence.choose`."""
    temps = [0.8, 1.0, 0.3, 1.7, 1e-40, 0.8, 2.0, 0.5]  # 1e-40 overflows: the exact path
    rng = np.random.default_rng(vocab)
    logits = (rng.normal(size=(len(temps), vocab)) * 4).astype(np.float32)

    def rows() -> list[Sequence]:
        return [
            Sequence(i, [1], SamplingParams(temperature=t, seed=100 + i, max_new_tokens=99))
            for i, t in enumerate(temps)
        ]

    seqs, ref = rows(), rows()
    for _ in range(40):  # the samplers advance step by step on both sides
        want = [s.choose(row) for s, row in zip(ref, logits, strict=True)]
        assert choose_all(seqs, logits) == want
    assert all(not plain_greedy(s) for s in seqs)
    # control: the rows' own temperatures matter (swapped, the same seeds draw other tokens)
    swapped = [
        Sequence(i, [1], SamplingParams(temperature=t, seed=100 + i))
        for i, t in enumerate(temps[::-1])
    ]
    assert choose_all(swapped, logits) != [s.choose(r) for s, r in zip(rows(), logits, strict=True)]
