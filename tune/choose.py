"""The choice among accepted candidates, the closest miss, the Pareto front, rank agreement.

Choice: the fastest accepted candidate; candidates within noise of it (the middle half of
their per-repeat speed ratios straddles 1, tune/speed.py `tied`) are ties, broken by lower
full-protocol KL, then by candidate key: the same figures give the same choice in any order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.tune.speed import ratio_band, tied

if TYPE_CHECKING:
    from kiln.tune.recipe import Budget
    from kiln.tune.search import Trial


def choose(
    trials: list[Trial], baseline: dict[str, Any] | None = None
) -> tuple[Trial | None, list[Trial]]:
    """(the chosen trial or None, the candidates tied with the fastest).

    With timed `baseline` figures (the fp32 export, same rounds), only candidates faster than
    it beyond noise (a quarter of the per-repeat ratios at most at or below 1) compete, when
    any is; on a loaded host the tie band is wide, and a tie with the fp32 export is no gain.
    """
    ok = [t for t in trials if t.status in ("accepted", "chosen") and t.speed and t.full]
    if not ok:
        return None, []
    if baseline and "samples" in baseline:
        faster = [t for t in ok if ratio_band(t.speed, baseline)[0] > 1.0]  # type: ignore[arg-type]
        ok = faster or ok
    fastest = max(ok, key=lambda t: (t.speed["tokens_per_s"], t.candidate.key))  # type: ignore[index]
    ties = [t for t in ok if t is fastest or tied(t.speed, fastest.speed)]  # type: ignore[arg-type]
    best = min(ties, key=lambda t: (t.full["kl_mean"], t.candidate.key))  # type: ignore[index]
    return best, sorted(ties, key=lambda t: t.candidate.key)


def closest(trials: list[Trial], budget: Budget) -> Trial | None:
    """The measured candidate that misses the budget by the least (deficits relative to limits)."""
    scale = {
        "kl_mean": budget.max_kl_mean or 1.0,
        "top1": 1 - budget.min_top1 or 1.0,
        "greedy": 1 - budget.min_greedy or 1.0,
        "ppl": budget.max_ppl_increase or 1.0,
    }
    measured = [t for t in trials if t.deficit and (t.full or t.proxy)]
    if not measured:
        return None
    return min(
        measured,
        key=lambda t: (sum(v / scale[k] for k, v in t.deficit.items()), t.candidate.key),
    )


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed, KL) no other point beats on both (faster and lower KL)."""
    front = []
    for i, (speed, kl) in enumerate(points):
        dominated = any(
            (s2 >= speed and k2 <= kl) and (s2 > speed or k2 < kl)
            for j, (s2, k2) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


def rank_agreement(proxy: list[float], full: list[float]) -> dict[str, Any]:
    """Spearman and Kendall rank correlation of proxy vs full KL (scipy when installed)."""
    n = len(proxy)
    if n < 3:
        return {"n": n, "spearman": None, "kendall": None, "why": "fewer than 3 graphs in full"}
    try:
        from scipy import stats

        rho = float(stats.spearmanr(proxy, full).statistic)
        tau = float(stats.kendalltau(proxy, full).statistic)
        how = "scipy.stats spearmanr / kendalltau"
    except ImportError:
        rp, rf = _ranks(proxy), _ranks(full)
        rho = float(np.corrcoef(rp, rf)[0, 1])
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
        score = sum(np.sign(proxy[i] - proxy[j]) * np.sign(full[i] - full[j]) for i, j in pairs)
        tau = float(score / len(pairs))
        how = "numpy: Pearson of ranks; Kendall tau-a"
    return {"n": n, "spearman": rho, "kendall": tau, "method": how}


def _ranks(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks
