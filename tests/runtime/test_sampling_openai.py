"""The OpenAI API's logit adjustments and logprobs against references written from the definitions.

OpenAI's definition (its API reference, "frequency and presence penalties"):
    mu[j] -> mu[j] + bias[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence
with c[j] the count of token j among the tokens generated so far (vLLM's `apply_penalties`
counts the output tokens only, as here). The references below are plain Python loops in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from kiln.errors import ConfigError
from kiln.runtime import SamplingParams
from kiln.runtime.decode import Sequence
from kiln.runtime.sampling import (
    adjust_logits,
    apply_repetition_penalty,
    token_logprobs,
)

V = 300


def _logits(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=V) * 3).astype(np.float32)


def reference_openai(
    logits: np.ndarray, out_ids: list[int], bias: dict[int, float], freq: float, pres: float
) -> list[float]:
    """The definition, token by token."""
    ref = []
    for j, mu in enumerate(logits.tolist()):
        c = out_ids.count(j)
        ref.append(mu + bias.get(j, 0.0) - c * freq - float(c > 0) * pres)
    return ref


@pytest.mark.parametrize(
    ("freq", "pres", "bias"),
    [(0.5, 0.0, {}), (0.0, 1.5, {}), (-2.0, 2.0, {}), (1.0, -0.5, {3: 100.0, 7: -100.0, 250: 2.5})],
)
def test_penalties_and_bias_equal_the_definition(freq, pres, bias):
    logits = _logits()
    prompt = [3, 3, 9, 11, 200]
    out = [5, 5, 5, 7, 9, 120, 5]
    params = SamplingParams(
        frequency_penalty=freq, presence_penalty=pres, logit_bias=tuple(bias.items())
    )
    got = adjust_logits(logits, params, prompt, out)
    ref = np.array(reference_openai(logits, out, bias, freq, pres))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)  # float32 logits of |x| < 110
    # control: counting the prompt too (a different rule) gives other logits
    wrong = np.array(reference_openai(logits, prompt + out, bias, freq, pres))
    assert np.abs(got - wrong).max() > 0.4


def test_repetition_penalty_sits_between_bias_and_penalties():
    """vLLM's order: bias, then the (multiplicative) repetition penalty, then the others."""
    logits = _logits(1)
    prompt, out = [3, 4], [4, 10, 10]
    bias = {4: 3.0, 10: -1.0, 11: 5.0}
    params = SamplingParams(
        repetition_penalty=1.7, frequency_penalty=0.3, logit_bias=tuple(bias.items())
    )
    got = adjust_logits(logits, params, prompt, out)
    biased = logits.astype(np.float64) + np.array([bias.get(j, 0.0) for j in range(V)])
    seen = set(prompt + out)
    rep = [(x * 1.7 if x < 0 else x / 1.7) if j in seen else x for j, x in enumerate(biased)]
    ref = np.array(reference_openai(np.array(rep), out, {}, 0.3, 0.0))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    # control: the penalty before the bias
    rep_first = apply_repetition_penalty(logits, seen, 1.7).astype(np.float64)
    other = np.array(reference_openai(rep_first, out, bias, 0.3, 0.0))
    assert np.abs(got - other).max() > 0.5


def test_no_adjustment_returns_the_logits_themselves():
    logits = _logits()
    assert adjust_logits(logits, SamplingParams(), [1, 2], [3, 3]) is logits


@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_logprobs_are_the_float64_log_softmax(k):
    logits = _logits(2)
    logits[17] = logits[18] = logits.max() + 1  # a tie at the top: ids break it
    lp = token_logprobs(logits, 42, k)
    z = math.log(sum(math.exp(x) for x in logits.astype(np.float64).tolist()))
    ref = [x - z for x in logits.astype(np.float64).tolist()]
    assert lp.token_id == 42
    assert lp.logprob == pytest.approx(ref[42], abs=1e-12)
    order = sorted(range(V), key=lambda j: (-ref[j], j))[:k]
    assert [t for t, _ in lp.top] == order
    assert [v for _, v in lp.top] == pytest.approx([ref[j] for j in order], abs=1e-12)
    if k:
        assert lp.top[0][0] == 17  # the tie at the top goes to the lower id
        assert lp.top[0][1] != pytest.approx(ref[42], abs=1e-3)  # control: not the chosen one
    if k > 1:
        assert lp.top[1][0] == 18


def test_sequence_reports_raw_logprobs_not_the_adjusted_ones():
    """Logprobs are the model's own distribution: bias, penalties and temperature leave them."""
    logits = _logits(3)
    params = SamplingParams(temperature=0.0, logit_bias=((7, 100.0),), logprobs=2)
    seq = Sequence(0, [1, 2], params)
    token = seq.choose(logits)
    assert token == 7  # the bias decided the choice...
    raw = token_logprobs(logits, 7, 2)
    assert seq.logprobs == raw  # ...but the logprob is the raw model's
    assert seq.logprobs.logprob < -1  # control: after the bias token 7 would be ~0


def test_logit_bias_minus_100_bans_the_greedy_token():
    logits = _logits(4)
    top = int(np.argmax(logits))
    seq = Sequence(0, [1], SamplingParams(temperature=0.0, logit_bias=((top, -100.0),)))
    assert seq.choose(logits) != top
    assert Sequence(0, [1], SamplingParams(temperature=0.0)).choose(logits) == top  # control


def test_choice_seeds_are_seed_plus_index():
    p = SamplingParams(temperature=1.0, seed=2**64 - 1)
    assert p.for_choice(0) is p
    assert p.for_choice(1).seed == 0  # wraps as a 64-bit word
    assert p.for_choice(3).seed == 2
    assert SamplingParams(seed=None).for_choice(2).seed is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -2.01),
        ("presence_penalty", math.nan),
        ("logit_bias", ((1, 100.5),)),
        ("logit_bias", ((1, math.nan),)),
        ("logprobs", 21),
        ("logprobs", -1),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"Sampling {field}="):
        SamplingParams(**{field: value})
    SamplingParams(**{field: {"logit_bias": ((1, 100.0),), "logprobs": 20}.get(field, 2.0)})


class OnlyTokens:
    """A TokenConstraint that allows a fixed set of tokens (complete after `steps` tokens)."""

    def __init__(self, allowed: set[int], steps: int = 99) -> None:
        self.allowed, self.steps = allowed, steps

    def mask(self, logits_V: np.ndarray) -> np.ndarray:
        keep = np.zeros(logits_V.shape, bool)
        keep[list(self.allowed)] = True
        return np.where(keep, logits_V, -np.inf).astype(logits_V.dtype)

    def accept(self, token_id: int) -> bool:
        assert token_id in self.allowed
        self.steps -= 1
        return self.steps == 0


def test_constraint_masks_every_draw_and_ends_the_sequence():
    allowed = {3, 40, 41}
    seq = Sequence(
        0, [1], SamplingParams(temperature=1.0, seed=0), constraint=OnlyTokens(allowed, 50)
    )
    while not seq.done:
        seq.accept(seq.choose(_logits(len(seq.out_ids))), room=1000)
    assert set(seq.out_ids) <= allowed and len(seq.out_ids) == 50 and seq.finish_reason == "stop"
    free = Sequence(0, [1], SamplingParams(temperature=1.0, seed=0))
    assert {free.choose(_logits(i)) for i in range(50)} - allowed  # control


def test_constraint_wins_over_a_penalty_that_overflows_the_allowed_tokens():
    logits = _logits(5)
    logits[7] = -3.0
    params = SamplingParams(temperature=0.0, repetition_penalty=1e308)
    seq = Sequence(0, [7], params, constraint=OnlyTokens({7}))
    assert seq.choose(logits) == 7  # -3 * 1e308 = -inf, yet 7 is the only token allowed
