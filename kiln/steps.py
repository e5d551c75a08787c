"""One shape for every unit of work (graph pass or build stage) and one runner that times it.

A `Step` has a name, an optional `requires` precondition, a `run` returning a `Result`, and an
optional `ensures` postcondition. `run_steps` logs each step, times it, optionally measures the
drift it caused through a `Probe`, judges that drift against the step's tolerance, and records
everything for the manifest. A step that fails is re-raised naming it and the steps before it.
Passes never measure themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np

from kiln.errors import KilnError, ParityError
from kiln.parity import compare, greedy_agreement
from kiln.precisions import Tol

log = logging.getLogger(__name__)

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)  # a probe only reads its value


@dataclass
class Result(Generic[T]):
    """What a step produced: the value after it, whether it changed, and what changed by kind."""

    value: T
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. why an expected fusion found no match


class Step(Generic[T]):
    """A named unit of work; subclasses set `name` and implement `run`."""

    name: ClassVar[str] = "step"
    tolerance: str | None = None  # TOL key the step's drift is judged by; None: not judged

    def requires(self, value: T) -> None:
        """Raise a KilnError when `value` is not something this step can run on."""

    def run(self, value: T) -> Result[T]:
        """Do the work and say what changed."""
        raise NotImplementedError

    def ensures(self, value: T) -> None:
        """Raise when the step's output breaks the step's promise."""


@dataclass
class Drift:
    """How far a step moved the probe outputs: against the step before and against the start."""

    max_abs: float
    agreement: float
    total_max_abs: float
    total_agreement: float
    worst: str  # Diff.describe() of the worst logit element against the step before

    def as_dict(self) -> dict[str, Any]:
        """Figures for a manifest."""
        return {
            "max_abs_logit": self.max_abs,
            "greedy_agreement": self.agreement,
            "total_max_abs_logit": self.total_max_abs,
            "total_greedy_agreement": self.total_agreement,
        }


class Probe(Protocol[T_contra]):
    """Runs fixed inputs through a value and returns its logits, one array per probe call."""

    def logits(self, value: T_contra) -> list[np.ndarray]:
        """Logits of every probe call, float32."""
        ...


@dataclass
class StepRecord:
    """One line of the pass table: counts, drift, time, and whether drift was accepted."""

    name: str
    changed: bool
    counts: dict[str, int]
    notes: list[str]
    elapsed_s: float
    drift: Drift | None = None
    tolerance: str | None = None
    within_budget: bool = True
    probe_s: float = 0.0  # time spent measuring drift (ORT), not part of elapsed_s

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON-able data."""
        return {
            "name": self.name,
            "changed": self.changed,
            "counts": self.counts,
            "notes": self.notes,
            "elapsed_s": round(self.elapsed_s, 4),
            "probe_s": round(self.probe_s, 4),
            "tolerance": self.tolerance,
            "drift": self.drift.as_dict() if self.drift else None,
            "within_budget": self.within_budget,
        }

    def line(self) -> str:
        """The pass-table line the CLI prints."""
        counts = ", ".join(f"{k} {v}" for k, v in self.counts.items() if v) or "no change"
        drift = (
            f"max|Δlogit| {self.drift.max_abs:8.2e}  agree {self.drift.agreement:6.1%}"
            if self.drift
            else f"{'(unchanged: not probed)':<31}"
        )
        flag = "" if self.within_budget else "  OVER BUDGET"
        return f"  {self.name:<22} {drift}  {self.elapsed_s:6.2f} s  {counts}{flag}"


def _drift(ref: list[np.ndarray], got: list[np.ndarray], start: list[np.ndarray]) -> Drift:
    loose = Tol(atol=np.inf, rtol=0.0)
    pairs = list(zip(ref, got, strict=True))
    diffs = [compare(f"logits[probe {i}]", r, g, loose) for i, (r, g) in enumerate(pairs)]
    totals = [compare("logits", s, g, loose) for s, g in zip(start, got, strict=True)]
    worst = max(diffs, key=lambda d: d.max_abs)
    return Drift(
        max_abs=worst.max_abs,
        agreement=float(np.mean([greedy_agreement(r, g) for r, g in pairs])),
        total_max_abs=max(d.max_abs for d in totals),
        total_agreement=float(
            np.mean([greedy_agreement(s, g) for s, g in zip(start, got, strict=True)])
        ),
        worst=worst.describe(),
    )


def _judge(drift: Drift, tol: Tol, ref: list[np.ndarray], got: list[np.ndarray]) -> bool:
    ok = all(compare("logits", r, g, tol).ok for r, g in zip(ref, got, strict=True))
    return ok and drift.agreement >= tol.agree


def run_steps(
    steps: Sequence[Step[T]],
    value: T,
    *,
    probe: Probe[T] | None = None,
    tolerances: dict[str, Tol] | None = None,
    allow_drift: bool = False,
    on_record: Callable[[StepRecord], None] | None = None,
) -> tuple[T, list[StepRecord]]:
    """Run `steps` in order on `value`; return the final value and one record per step.

    With a `probe`, each step's drift is measured against the step before it and against the
    start, and judged by `tolerances[step.tolerance]`; past budget a ParityError names the step
    unless `allow_drift` (then the record says so and the run goes on).
    """
    records: list[StepRecord] = []
    start = previous = probe.logits(value) if probe else None
    for step in steps:
        t0 = time.perf_counter()
        try:
            step.requires(value)
            result = step.run(value)
            step.ensures(result.value)
        except Exception as e:
            done = ", ".join(r.name for r in records) or "none"
            msg = f"step {step.name!r} failed (steps done before it: {done}): {e}"
            if isinstance(e, KilnError):
                raise type(e)(msg) from e
            raise RuntimeError(msg) from e
        elapsed = time.perf_counter() - t0
        value = result.value
        record = StepRecord(step.name, result.changed, result.counts, result.notes, elapsed)
        record.tolerance = step.tolerance
        # A step that reports no change is not re-probed (drift stays None: not measured).
        if probe is not None and start is not None and previous is not None and result.changed:
            t1 = time.perf_counter()
            got = probe.logits(value)
            record.probe_s = time.perf_counter() - t1
            record.drift = _drift(previous, got, start)
            if step.tolerance is not None and tolerances is not None:
                record.within_budget = _judge(
                    record.drift, tolerances[step.tolerance], previous, got
                )
            previous = got
        records.append(record)
        log.info("%s", record.line())
        for note in result.notes:
            log.info("    %s", note)
        if on_record:
            on_record(record)
        if not record.within_budget:
            # Only a step judged above (drift measured against a tolerance) is out of budget.
            assert (
                record.drift is not None and step.tolerance is not None and tolerances is not None
            )
            tol = tolerances[step.tolerance]
            msg = (
                f"pass {step.name!r} drifted past the {step.tolerance} budget (atol {tol.atol:g}, "
                f"rtol {tol.rtol:g}, agreement >= {tol.agree:g}): {record.drift.worst}; "
                f"greedy agreement {record.drift.agreement:.3f}."
            )
            if not allow_drift:
                raise ParityError(
                    f"{msg}\nSkip the pass (--skip {step.name}) or rerun with --allow-drift to "
                    "keep the result (the manifest records it)."
                )
            log.warning("%s Kept because of --allow-drift.", msg)
    return value, records
