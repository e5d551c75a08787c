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
    """How far one output is from its reference, and where the worst element sits.

    `torch_max_abs` is set when the reference is float64 (fp32 checks): PyTorch fp32's own
    max error against it on the same elements, the noise floor the graph is judged against.
    `allowed` is the max |Δ| the tolerance allows this output (elementwise rtol aside);
    `noise_capped` says PyTorch fp32 was further off float64 than rounding explains (the budget
    then counts only Tol.noise_cap of the output's magnitude).
    """

    name: str
    max_abs: float
    max_rel: float
    worst_index: tuple[int, ...]
    ref_value: float
    got_value: float
    ok: bool
    allowed: float = 0.0
    torch_max_abs: float | None = None
    noise_capped: bool = False

    def describe(self) -> str:
        """One line naming the output, the worst element and both values."""
        ref = "f64" if self.torch_max_abs is not None else "ref"
        line = (
            f"{self.name}: max|Δ| {self.max_abs:.3g} (rel {self.max_rel:.3g}) at "
            f"{list(self.worst_index)}: {ref} {self.ref_value:.6g} vs got {self.got_value:.6g}"
        )
        if self.torch_max_abs is not None:
            line += f"; PyTorch fp32 max|Δ| {self.torch_max_abs:.3g} vs f64"
            if self.noise_capped:
                line += " (more than fp32 rounding explains: the PyTorch reference is suspect)"
        return line


def _worst(name: str, ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray, Diff]:
    """|ref - got| in float64 (NaN as inf), |ref|, and a Diff at the worst element (ok unset)."""
    if ref.shape != got.shape:
        raise ParityError(f"{name}: shape {got.shape} differs from the reference's {ref.shape}.")
    r = np.asarray(ref, dtype=np.float64)
    g = np.asarray(got, dtype=np.float64)
    err = np.abs(r - g)
    err = np.where(np.isnan(err), np.inf, err)
    if err.size == 0:
        return err, np.abs(r), Diff(name, 0.0, 0.0, (), 0.0, 0.0, True)
    idx = np.unravel_index(int(np.argmax(err)), err.shape)
    rel = err / np.maximum(np.abs(r), 1e-6)
    diff = Diff(
        name=name,
        max_abs=float(err[idx]),
        max_rel=float(rel.max()),
        worst_index=tuple(int(i) for i in idx),
        ref_value=float(r[idx]),
        got_value=float(g[idx]),
        ok=True,
    )
    return err, np.abs(r), diff


def compare(name: str, ref: np.ndarray, got: np.ndarray, tol: Tol) -> Diff:
    """Compare two arrays of the same shape in float64; NaN anywhere counts as a failure.

    Elementwise: |got - ref| <= tol.atol + tol.scale * max|ref| + tol.rtol * |ref|.
    """
    err, mag, diff = _worst(name, ref, got)
    if err.size:
        diff.allowed = tol.budget(float(mag.max()))
        diff.ok = bool(np.all(err <= diff.allowed + tol.rtol * mag))
    return diff


def compare_to_float64(
    name: str, f64: np.ndarray, torch_fp32: np.ndarray, got: np.ndarray, tol: Tol
) -> Diff:
    """Judge `got` against float64 truth by PyTorch fp32's own error on the same elements.

    ok when max|got - f64| <= tol.noise * min(max|torch_fp32 - f64|, tol.noise_cap * max|f64|)
    + tol.floor (kiln/precisions.py Tol says why the cap).
    """
    assert tol.noise is not None, "compare_to_float64 needs a Tol with `noise` set"
    err, mag, diff = _worst(name, f64, got)
    noise, _, _ = _worst(name, f64, torch_fp32)
    diff.torch_max_abs = float(noise.max()) if noise.size else 0.0
    cap = tol.noise_cap * float(mag.max()) if mag.size else 0.0
    diff.noise_capped = diff.torch_max_abs > cap
    diff.allowed = tol.noise * min(diff.torch_max_abs, cap) + tol.floor
    diff.ok = bool(err.size == 0 or err.max() <= diff.allowed)
    return diff


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

    @property
    def against_float64(self) -> bool:
        """Whether outputs were judged against a float64 reference (the fp32 noise-floor check)."""
        return any(d.torch_max_abs is not None for d in self.diffs)

    def summary(self) -> dict[str, object]:
        """Figures for a manifest: worst logit and KV errors, agreement, the tolerance.

        Against float64, `*_max_abs` is the graph's error against it and `torch_fp32_*` PyTorch
        fp32's own, `noise_capped` how many outputs had PyTorch's error capped (Tol.noise_cap);
        `worst_budget_ratio` is max over outputs of max|Δ| / allowed (<= 1 passes).
        """
        logits = [d for d in self.diffs if "logits" in d.name]
        kv = [d for d in self.diffs if "logits" not in d.name]
        out: dict[str, object] = {
            "precision": self.precision,
            "tolerance": asdict(self.tol),
            "reference": "PyTorch float64" if self.against_float64 else "PyTorch fp32",
            "logits_max_abs": max((d.max_abs for d in logits), default=0.0),
            "logits_max_rel": max((d.max_rel for d in logits), default=0.0),
            "kv_max_abs": max((d.max_abs for d in kv), default=0.0),
        }
        if self.against_float64:
            out["torch_fp32_logits_max_abs"] = max(
                (d.torch_max_abs or 0.0 for d in logits), default=0.0
            )
            out["torch_fp32_kv_max_abs"] = max((d.torch_max_abs or 0.0 for d in kv), default=0.0)
            out["noise_capped"] = sum(d.noise_capped for d in self.diffs)
        ratios = [d.max_abs / d.allowed for d in self.diffs if d.allowed > 0]
        out["worst_budget_ratio"] = max(ratios, default=0.0)
        out["greedy_agreement"] = self.agreement
        out["comparisons"] = len(self.diffs)
        out["ok"] = self.ok
        return out

    def describe(self) -> str:
        """One log line: the worst logit error, and against float64 PyTorch fp32's own."""
        logits = [d for d in self.diffs if "logits" in d.name] or self.diffs
        worst = max(logits, key=lambda d: d.max_abs)
        if not self.against_float64:
            return f"{worst.describe()}; greedy agreement {self.agreement:.3f}"
        torch = max(d.torch_max_abs or 0.0 for d in logits)
        return (
            f"logits max|Δ| vs float64: graph {worst.max_abs:.3g}, PyTorch fp32 {torch:.3g} "
            f"(allowed {self.tol.noise:g}x PyTorch's per output, counted up to "
            f"{self.tol.noise_cap:g} of max|f64|, + {self.tol.floor:g}); "
            f"greedy agreement {self.agreement:.3f}; worst {worst.describe()}"
        )

    def raise_if_failed(self, what: str) -> None:
        """Raise a ParityError naming the worst element and the tolerance that would pass."""
        if self.ok:
            return
        bad = [d for d in self.diffs if not d.ok]
        if self.against_float64:
            worst = max(bad or self.diffs, key=lambda d: d.max_abs / max(d.allowed, 1e-30))
            rule = (
                f"{self.tol.noise:g}x PyTorch fp32's error against float64, counted up to "
                f"{self.tol.noise_cap:g} of max|f64|, + {self.tol.floor:g}; "
                f"agreement >= {self.tol.agree:g}"
            )
            noise = self.tol.noise or 1.0  # set: the check was against float64
            counted = (worst.allowed - self.tol.floor) / noise  # PyTorch's error after the cap
            factor = (worst.max_abs - self.tol.floor) / max(counted, 1e-30)
            passing = (
                f"a factor of {factor:.3g}x (max|Δ| {worst.max_abs:.3g} against PyTorch fp32's "
                f"{counted:.3g}"
                + (f", capped from {worst.torch_max_abs:.3g}" if worst.noise_capped else "")
                + ") would have passed"
            )
        else:
            worst = max(bad or self.diffs, key=lambda d: d.max_abs)
            rule = (
                f"atol {self.tol.atol:g}, scale {self.tol.scale:g}, rtol {self.tol.rtol:g}, "
                f"agreement >= {self.tol.agree:g}"
            )
            needed = worst.max_abs - (worst.allowed - self.tol.atol)  # the scale term kept
            passing = f"atol {needed:.3g} would have passed"
        lines = [
            f"{what} drifted past the {self.precision} tolerance ({rule}).",
            f"  worst: {worst.describe()}",
            f"  greedy agreement {self.agreement:.3f}; {len(bad)} of {len(self.diffs)} outputs "
            f"out of tolerance; {passing}.",
            "  Rerun with --allow-drift to keep the artifact anyway (the manifest records it).",
        ]
        raise ParityError("\n".join(lines))
