"""Numerical comparison against a reference, judged by each precision's tolerance.

The CLI checks and the tests share TOL, read from the precision records (kiln/precisions.py),
so a tolerance is stated (and changed) in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kiln.errors import ParityError
from kiln.precisions import PRECISIONS, Tol

# Each precision's tolerance is stated once, on its record in kiln/precisions.py.
TOL: dict[str, Tol] = {name: p.tol for name, p in PRECISIONS.items()}


@dataclass
class Diff:
    """How far one output is from its reference, and where the worst element sits."""

    name: str
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...]
    ref_value: float
    got_value: float
    ok: bool

    def describe(self) -> str:
        """One line naming the output, the worst element and both values."""
        return (
            f"{self.name}: max|Δ| {self.max_abs:.3g} (rel {self.max_rel:.3g}) at "
            f"{list(self.worst_index)}: ref {self.ref_value:.6g} vs got {self.got_value:.6g}"
        )


def compare(name: str, ref: np.ndarray, got: np.ndarray, tol: Tol) -> Diff:
    """Compare two arrays of the same shape in float64; NaN anywhere counts as a failure."""
    if ref.shape != got.shape:
        raise ParityError(f"{name}: shape {got.shape} differs from the reference's {ref.shape}.")
    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    err = np.abs(r - g)
    err = np.where(np.isnan(err), np.inf, err)
    if err.size == 0:
        return Diff(name, 0.0, 0.0, (), 0.0, 0.0, True)
    idx = np.unravel_index(int(np.argmax(err)), err.shape)
    rel = err / np.maximum(np.abs(r), 1e-6)
    ok = bool(np.all(err <= tol.atol + tol.rtol * np.abs(r)))
    return Diff(
        name=name,
        max_abs=float(err[idx]),
        max_rel=float(rel.max()),
        worst_index=tuple(int(i) for i in idx),
        ref_value=float(r[idx]),
        got_value=float(g[idx]),
        ok=ok,
    )


def greedy_agreement(ref_logits: np.ndarray, got_logits: np.ndarray) -> float:
    """Fraction of positions (all leading axes) whose argmax over the last axis agrees."""
    a = np.argmax(ref_logits, axis=-1)
    b = np.argmax(got_logits, axis=-1)
    return float((a == b).mean()) if a.size else 1.0


@dataclass
class ParityReport:
    """All comparisons of one check, judged against one tolerance."""

    precision: str
    tol: Tol
    diffs: list[Diff]
    agreement: float

    @property
    def ok(self) -> bool:
        """True when every output is within tolerance and greedy agreement is high enough."""
        return all(d.ok for d in self.diffs) and self.agreement >= self.tol.agree

    def worst(self) -> Diff:
        """The comparison with the largest absolute error."""
        return max(self.diffs, key=lambda d: d.max_abs)

    def summary(self) -> dict[str, object]:
        """Figures for a manifest: worst logit and KV errors, agreement, the tolerance."""
        logits = [d for d in self.diffs if "logits" in d.name]
        kv = [d for d in self.diffs if "logits" not in d.name]
        return {
            "precision": self.precision,
            "tolerance": asdict(self.tol),
            "logits_max_abs": max((d.max_abs for d in logits), default=0.0),
            "logits_max_rel": max((d.max_rel for d in logits), default=0.0),
            "kv_max_abs": max((d.max_abs for d in kv), default=0.0),
            "greedy_agreement": self.agreement,
            "comparisons": len(self.diffs),
            "ok": self.ok,
        }

    def raise_if_failed(self, what: str) -> None:
        """Raise a ParityError naming the worst element and the tolerance that would pass."""
        if self.ok:
            return
        bad = [d for d in self.diffs if not d.ok]
        worst = max(bad, key=lambda d: d.max_abs) if bad else self.worst()
        lines = [
            f"{what} drifted past the {self.precision} tolerance "
            f"(atol {self.tol.atol:g}, rtol {self.tol.rtol:g}, agreement >= {self.tol.agree:g}).",
            f"  worst: {worst.describe()}",
            f"  greedy agreement {self.agreement:.3f}; {len(bad)} of {len(self.diffs)} outputs "
            f"out of tolerance; atol {worst.max_abs:.3g} would have passed.",
            "  Rerun with --allow-drift to keep the artifact anyway (the manifest records it).",
        ]
        raise ParityError("\n".join(lines))
