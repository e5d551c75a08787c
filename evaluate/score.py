"""The measurements: strided perplexity, KL(reference || candidate), top-1 and greedy agreement.

Both models see identical calls (the same windows as fresh prefills; the same prompts, then
one token at a time), so every difference is the graphs'. Log-probabilities are taken in
float64 from each model's float32 logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kiln.evaluate.models import LogitModel
from kiln.evaluate.windows import Window


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    out: np.ndarray = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out


@dataclass
class Totals:
    """Running sums over scored positions."""

    scored: int = 0
    nll: float = 0.0  # candidate's -log p(next token)
    ref_nll: float = 0.0
    kl: float = 0.0
    kl_max: float = 0.0
    top1: int = 0

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood) of the candidate."""
        return math.exp(self.nll / self.scored)


def score_windows(
    ids: list[int],
    windows: list[Window],
    model: LogitModel,
    reference: LogitModel | None,
) -> Totals:
    """Sum NLL over each window's scored tokens; with a reference, KL and top-1 there too."""
    t = Totals()
    for w in windows:
        chunk = ids[w.begin : w.end]
        # Row r predicts chunk[r + 1]: the scored targets' predicting rows end one before.
        rows = slice(len(chunk) - w.scored - 1, len(chunk) - 1)
        targets = np.array(chunk[len(chunk) - w.scored :])
        lp = log_softmax(model.prefill(chunk)[rows])
        t.nll -= float(lp[np.arange(w.scored), targets].sum())
        t.scored += w.scored
        if reference is None:
            continue
        lq = log_softmax(reference.prefill(chunk)[rows])
        t.ref_nll -= float(lq[np.arange(w.scored), targets].sum())
        kl = (np.exp(lq) * (lq - lp)).sum(axis=-1)
        t.kl += float(kl.sum())
        t.kl_max = max(t.kl_max, float(kl.max()))
        t.top1 += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    return t


@dataclass
class Greedy:
    """Per prompt: the reference's greedy tokens and whether the candidate's argmax agreed."""

    ref_tokens: list[list[int]] = field(default_factory=list)
    agree: list[list[bool]] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        """Fraction of all generated positions where the candidate picked the reference's token."""
        flat = [a for row in self.agree for a in row]
        return sum(flat) / len(flat)

    @property
    def per_prompt(self) -> list[float]:
        """The agreement of each prompt."""
        return [sum(row) / len(row) for row in self.agree]


def greedy_agreement(
    prompts: list[list[int]], n: int, model: LogitModel, reference: LogitModel
) -> Greedy:
    """The reference decodes `n` tokens greedily; the candidate is teacher-forced along them.

    Both run a prefill of the prompt and then one token per call on their cache, so a candidate
    that drifts with cache length shows it here even where window scores agree.
    """
    g = Greedy()
    for prompt in prompts:
        ref_logits, got_logits = reference.prefill(prompt)[-1], model.prefill(prompt)[-1]
        tokens: list[int] = []
        agree: list[bool] = []
        for i in range(n):
            token = int(np.argmax(ref_logits))
            tokens.append(token)
            agree.append(int(np.argmax(got_logits)) == token)
            if i + 1 < n:
                ref_logits, got_logits = reference.step(token), model.step(token)
        g.ref_tokens.append(tokens)
        g.agree.append(agree)
    return g
