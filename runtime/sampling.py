"""Choosing the next token from logits: greedy, temperature, top-k, top-p, penalties, logprobs.

The warps follow transformers' `generate()` (RepetitionPenaltyLogitsProcessor, then
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, then a draw from the softmax),
written in numpy so a serving image needs no PyTorch; tests compare each step with the
transformers processor on the same logits.

The OpenAI API's adjustments come first, in vLLM's order (its v1 sampler): `logit_bias` added
to the raw logits, then the repetition penalty (over prompt and output, as transformers), then
the frequency penalty (`count * alpha` subtracted, counted over the generated tokens only) and
the presence penalty (`alpha` subtracted from every token generated at least once), as OpenAI
defines them and vLLM's `apply_penalties` computes them. A token constraint (a grammar's mask,
runtime/structured.py) then removes tokens, and the warps and the draw follow.

Logprobs are the log-softmax of the model's raw logits, before any bias, penalty, mask,
temperature or truncation: the model's own distribution, as OpenAI reports and as vLLM's default
`logprobs_mode="raw_logprobs"` does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from kiln.errors import ConfigError

# Letters in names: B batch, V vocab.

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs (and vLLM's default max_logprobs)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens and when it stops.

    temperature 0 (or top_k 1) is greedy. `seed` makes sampling reproducible; None draws fresh
    entropy. `stop` strings end the text before them; `stop_token_ids` add to the model's EOS.

    A seed is any 64-bit integer, signed or unsigned ([-2**63, 2**64 - 1]), as the OpenAI API
    types it an integer and vLLM accepts signed 64-bit seeds. It is taken as a 64-bit word:
    `seed % 2**64`, the two's complement of a negative seed (-1 and 2**64 - 1 draw the same
    tokens), so every such seed is reproducible and non-negative seeds keep their streams. A seed
    outside both ranges is refused rather than folded, since it cannot be a 64-bit value.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) pairs
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k's logprobs

    def __post_init__(self) -> None:
        """Reject values that have no meaning, naming the field and the allowed range."""
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1"),
            (self.min_new_tokens >= 0, "min_new_tokens", "must be >= 0"),
            (self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy)"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 keeps every token)"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 is off)"),
            (
                self.seed is None or -(2**63) <= self.seed < 2**64,
                "seed",
                "must be a 64-bit integer, from -2**63 to 2**64 - 1 (negative seeds count as "
                "their two's complement)",
            ),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (
                all(-100 <= b <= 100 for _, b in self.logit_bias),
                "logit_bias",
                "must map token ids to biases in [-100, 100]",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
                "logprobs",
                f"must be from 0 to {MAX_TOP_LOGPROBS} (top tokens per position)",
            ),
        ]
        for ok, name, rule in checks:
            if not ok:
                raise ConfigError(f"Sampling {name}={getattr(self, name)!r} {rule}.")
        if any(s == "" for s in self.stop):
            raise ConfigError("Sampling stop contains an empty string; give non-empty strings.")

    def for_choice(self, i: int) -> SamplingParams:
        """The params of choice `i` of n: its seed is seed + i (as a 64-bit word).

        So choice i of a seeded request draws what a single request with seed + i draws;
        unseeded choices each draw fresh entropy.
        """
        if self.seed is None or i == 0:
            return self
        return replace(self, seed=(self.seed + i) % 2**64)

    @property
    def adjusts(self) -> bool:
        """True when logit_bias or a presence/frequency penalty changes the logits."""
        return bool(self.logit_bias) or self.presence_penalty != 0 or self.frequency_penalty != 0

    def generator(self) -> np.random.Generator:
        """The sampler's random generator: seeded by the seed as a 64-bit word, else fresh."""
        return np.random.default_rng(None if self.seed is None else self.seed % 2**64)

    @property
    def greedy(self) -> bool:
        """True when the choice is the argmax (no randomness at all)."""
        return self.temperature == 0 or self.top_k == 1


def apply_repetition_penalty(
    logits_V: np.ndarray, seen: Iterable[int], penalty: float
) -> np.ndarray:
    """CTRL-style penalty (arXiv:1909.05858) as transformers does: shrink seen tokens' logits."""
    if penalty == 1.0:
        return logits_V
    idx = np.fromiter(set(seen), dtype=np.int64)
    if idx.size == 0:
        return logits_V
    out = logits_V.copy()
    vals = out[idx].astype(np.float64)  # a tiny penalty overflows to +inf, never 0/0 = NaN
    with np.errstate(over="ignore", invalid="ignore"):  # (np.where computes both branches)
        out[idx] = np.where(vals < 0, vals * penalty, vals / penalty)
    return out


def add_logit_bias(logits_V: np.ndarray, bias: tuple[tuple[int, float], ...]) -> np.ndarray:
    """OpenAI's logit_bias: each listed token's logit plus its bias (-100 about bans it)."""
    if not bias:
        return logits_V
    out = logits_V.astype(np.float32, copy=True)
    ids, vals = zip(*bias, strict=True)
    np.add.at(out, np.asarray(ids, dtype=np.int64), np.asarray(vals, dtype=np.float32))
    return out


def penalize_output(
    logits_V: np.ndarray, params: SamplingParams, out_ids: Sequence[int]
) -> np.ndarray:
    """Frequency (`count * alpha`) and presence (`alpha` once seen) penalties over out_ids."""
    if (params.frequency_penalty == 0 and params.presence_penalty == 0) or not out_ids:
        return logits_V
    ids, counts = np.unique(np.asarray(out_ids, dtype=np.int64), return_counts=True)
    out = logits_V.astype(np.float32, copy=True)
    out[ids] -= (params.frequency_penalty * counts + params.presence_penalty).astype(np.float32)
    return out


def adjust_logits(
    logits_V: np.ndarray, params: SamplingParams, prompt_ids: Sequence[int], out_ids: Sequence[int]
) -> np.ndarray:
    """Every logit adjustment before the warps, in vLLM's order (module doc)."""
    logits_V = add_logit_bias(logits_V, params.logit_bias)
    if params.repetition_penalty != 1:
        seen = itertools.chain(prompt_ids, out_ids)
        logits_V = apply_repetition_penalty(logits_V, seen, params.repetition_penalty)
    return penalize_output(logits_V, params, out_ids)


@dataclass(frozen=True)
class TokenLogprobs:
    """The chosen token's logprob and the `k` most likely tokens' (id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def token_logprobs(logits_V: np.ndarray, token_id: int, k: int) -> TokenLogprobs:
    """Log-softmax of the raw logits (float64) at the chosen token, and the top k."""
    x = logits_V.astype(np.float64)
    top = np.max(x)
    logp = x - top - np.log(np.sum(np.exp(x - top)))
    best = np.argpartition(-logp, k - 1)[:k] if 0 < k < logp.shape[-1] else np.arange(logp.size)
    best = best[np.lexsort((best, -logp[best]))][:k]  # best first; ties by id
    pairs = tuple((int(i), float(logp[i])) for i in best)
    return TokenLogprobs(int(token_id), float(logp[token_id]), pairs)


def warp(logits_V: np.ndarray, *, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature, then top-k, then top-p filtering; removed tokens get -inf (a float32 copy).

    The division is `_divide`'s (float32, as transformers' TemperatureLogitsWarper divides).
    """
    out = logits_V.astype(np.float32, copy=True)
    if temperature not in (0.0, 1.0):
        t = np.float64(temperature)
        with np.errstate(over="ignore", invalid="ignore"):
            _divide(out, np.array([temperature]))
            if not np.isfinite(out.max()):
                # the top overflowed: measure from the top instead (softmax, top-k and top-p do
                # not see a shift), so the T -> 0 limit holds: only the top tokens keep mass
                top = logits_V.max()
                scaled = np.where(logits_V == top, 0, (logits_V - top) / t)
                out = scaled.astype(np.float32)
    if 0 < top_k < out.shape[-1]:
        kth = np.partition(out, -top_k)[-top_k]
        out[out < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(out, kind="stable")  # ascending, as TopPLogitsWarper sorts
        probs = _softmax(out[order])
        cum = np.cumsum(probs)
        remove = cum <= (1 - top_p)
        remove[-1] = False  # keep at least the most likely token
        out[order[remove]] = -np.inf
    return out


def sample_next(logits_V: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """The next token id for one row of adjusted logits: argmax, or a draw from the warps."""
    if params.greedy:
        return int(np.argmax(logits_V))
    warped = warp(logits_V, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    return draw(_exp_weights(warped), rng)


def _divide(x: np.ndarray, t: np.ndarray) -> None:
    """Divide x by t in place: float32 x [V] with t [1], or [N, V] with t [N, 1] (per row).

    In float32, as transformers divides float32 scores (5x faster than float64 here), unless
    t is below float32's smallest normal: a tiny temperature would round to 0 or lose digits,
    so that row divides in float64, cast back into x chunk by chunk. Row by row the result is
    the same whether the row is divided alone or in a batch.
    """
    tiny = t < np.finfo(np.float32).tiny
    if not tiny.any():
        np.divide(x, t.astype(np.float32), out=x)
    elif x.ndim == 1:
        np.divide(x, t, out=x, casting="same_kind", dtype=np.float64)
    else:
        for row, t_row in zip(x, t, strict=True):
            _divide(row, t_row)


def sample_tempered(
    logits_NV: np.ndarray, temperatures: Sequence[float], rngs: Sequence[np.random.Generator]
) -> list[int | None]:
    """`sample_next` for rows that set only a temperature, divided as one [N, V] array.

    Each row is `warp` (`_divide` into a float32 copy) then `_exp_weights` and a draw with its
    own rng, so the tokens equal `sample_next` row by row. None for a row whose scaled top
    overflowed: `warp`'s exact fallback is per row.
    """
    w = logits_NV.astype(np.float32, copy=True)
    with np.errstate(over="ignore", invalid="ignore"):
        _divide(w, np.asarray(temperatures, np.float64)[:, None])
    return [
        draw(_exp_weights(row), rng) if np.isfinite(row.max()) else None
        for row, rng in zip(w, rngs, strict=True)
    ]


_BLOCK = 256  # tokens per block of the two-level inverse CDF in `draw`


def draw(probs_V: np.ndarray, rng: np.random.Generator) -> int:
    """One token from a categorical distribution by inverse CDF, with one uniform draw.

    `probs_V` may be unnormalized weights (any float dtype): the draw is scaled by their sum.

    `Generator.choice(V, p=probs)` validates p and takes a float64 cumulative sum over the
    whole vocabulary (~0.6 ms at V = 49152, most of a served token's sampling time). Here the
    block sums find the block that holds the draw and only that block is summed token by
    token: the same distribution, one `rng.random()` per token as before, 25 us. A token of
    probability 0 is never returned.
    """
    pad = (-probs_V.shape[-1]) % _BLOCK
    padded = np.concatenate([probs_V, np.zeros(pad)]) if pad else probs_V  # no copy at 49152
    blocks = padded.reshape(-1, _BLOCK)
    cum = np.cumsum(blocks.sum(axis=1, dtype=np.float64))
    target = rng.random() * cum[-1]
    b = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
    while b and cum[b] == cum[b - 1]:  # rounding put the target at the end: skip empty blocks
        b -= 1
    within = (cum[b - 1] if b else 0.0) + np.cumsum(blocks[b], dtype=np.float64)
    i = int(np.searchsorted(within, target, side="right"))
    if i >= _BLOCK or blocks[b, i] <= 0:  # rounding carried the target past the block's end
        i = int(np.flatnonzero(blocks[b] > 0)[-1])
    return b * _BLOCK + i


class TokenConstraint(Protocol):
    """A rule over the next token (a grammar, runtime/structured.py): the sampler's mask hook."""

    def mask(self, logits_V: np.ndarray) -> np.ndarray:
        """The logits with every token the rule forbids next set to -inf."""
        ...

    def accept(self, token_id: int) -> bool:
        """Advance over the chosen token; True when the rule is complete (only EOS may follow)."""
        ...


def suppress(logits_V: np.ndarray, token_ids: Iterable[int]) -> np.ndarray:
    """Logits with `token_ids` made impossible (min_new_tokens keeps EOS away, as HF does)."""
    idx = list(token_ids)
    if not idx:
        return logits_V
    out = logits_V.copy()
    out[idx] = -np.inf
    return out


def _exp_weights(x_V: np.ndarray) -> np.ndarray:
    """exp(x - max) in place over a float32 copy: the softmax's weights before dividing by the sum.

    `draw` scales by the sum itself, so the division is not needed; float32 exp is SIMD (a
    float64 softmax took ~0.4 ms at V = 49152, half a sampled token's time). A weight below
    float32's smallest (x - max < -103, a relative probability under 1e-45) becomes 0. An
    infinite top (a tiny repetition penalty overflows) gives its tokens all the mass.
    """
    top = x_V.max()
    if not np.isfinite(top):
        return _softmax(x_V)
    x_V -= top
    np.exp(x_V, out=x_V)
    return x_V


def _softmax(x: np.ndarray) -> np.ndarray:
    """Softmax, also over an infinite top logit (a tiny repetition penalty overflows).

    The tokens at the top then share the mass, as in the limit of a vanishing penalty.
    """
    top = np.max(x)
    e = np.exp(x - top) if np.isfinite(top) else (x == top).astype(x.dtype)
    probs: np.ndarray = e / e.sum()
    return probs
