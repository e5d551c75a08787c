"""Mixed precision under a weight budget: int4, int8 or float per group of MatMuls.

A group is every constant-weight MatMul reading one input (Q/K/V, gate/up: kept at one
precision, since packing and fusions need them alike). Sensitivity: the mean KL of the
next-token distribution on the calibration sequences (ONNX Runtime, no backward pass) when that
group alone is quantized round-to-nearest to int4 or int8. Plan: start with every group at int4
(the smallest graph), then repeatedly take the upgrade (int4 -> int8, int8 -> float) with the
most KL removed per byte added that still fits the budget: a greedy knapsack.

The int4 groups are then rounded with GPTQ (optimize/calibrated.py), the int8 ones
round-to-nearest; on the onnxruntime target both become MatMulNBits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from kiln.errors import ConfigError
from kiln.optimize.base import GraphPass, count_delta, op_counts
from kiln.optimize.calibrate import Calibration, log_probs, mean_kl
from kiln.optimize.calibrated import CalibratedPass, calibrated_int4, to_matmul_nbits
from kiln.optimize.precision.weight_only import _weights, pick_block, quantize_weights
from kiln.steps import Result

MIB = 2**20
LEVELS = ("int4", "int8", "float")

log = logging.getLogger(__name__)


@dataclass
class Group:
    """MatMuls sharing one input: their weights, bytes at each level, KL when quantized."""

    input: str
    weights: list[str]
    shapes: list[tuple[int, int]]
    bytes: dict[str, int]
    kl: dict[str, float] = field(default_factory=dict)
    level: str = "int4"

    def row(self) -> dict[str, Any]:
        """The manifest line of this group."""
        return {
            "input": self.input,
            "weights": self.weights,
            "shapes": self.shapes,
            "bytes": self.bytes,
            "kl": {k: round(v, 8) for k, v in self.kl.items()},
            "precision": self.level,
        }


def _level_bytes(k: int, n: int, itemsize: int) -> dict[str, int] | None:
    b4, b8 = pick_block(k, 32), pick_block(k, 128)
    if b4 is None or b8 is None:
        return None
    return {
        "int4": k * n // 2 + (k // b4) * n * itemsize,
        "int8": k * n + (k // b8) * n * itemsize,
        "float": k * n * itemsize,
    }


def groups_of(model: ir.Model) -> tuple[list[Group], int]:
    """The quantizable groups in graph order, and the bytes of every other initializer."""
    groups: dict[str, Group] = {}
    grouped: set[str] = set()
    for m in _weights(model.graph):
        k, n = (int(d) for d in m.data.shape.numpy())
        cost = _level_bytes(k, n, int(m.data.dtype.itemsize))
        if cost is None or m.w.name is None or m.x.name is None or m.w.name in grouped:
            continue
        g = groups.setdefault(m.x.name, Group(m.x.name, [], [], dict.fromkeys(LEVELS, 0)))
        g.weights.append(m.w.name)
        g.shapes.append((k, n))
        for level, b in cost.items():
            g.bytes[level] += b
        grouped.add(m.w.name)
    fixed = sum(
        int(v.const_value.nbytes)
        for name, v in model.graph.initializers.items()
        if v.const_value is not None and name not in grouped
    )
    return list(groups.values()), fixed


def _quantize(model: ir.Model, names: set[str], bits: int) -> None:
    quantize_weights(
        model, bits=bits, block=32 if bits == 4 else 128, only=lambda m: m.w.name in names
    )


def sensitivities(model: ir.Model, groups: list[Group], calibration: Calibration) -> None:
    """Fill each group's KL at int4 and int8 (that group alone quantized, round-to-nearest)."""
    reference = log_probs(model, calibration)
    proto = ir.serde.serialize_model(model)
    for i, g in enumerate(groups):
        log.info("sensitivity of group %d/%d (%s)", i + 1, len(groups), "+".join(g.weights))
        for level, bits in (("int4", 4), ("int8", 8)):
            trial = ir.serde.deserialize_model(proto)
            _quantize(trial, set(g.weights), bits)
            g.kl[level] = mean_kl(reference, log_probs(trial, calibration))
        g.kl["float"] = 0.0


def plan(groups: list[Group], fixed: int, budget_bytes: int) -> int:
    """Set each group's level: greedy KL removed per byte within the budget; total bytes."""
    for g in groups:
        g.level = "int4"
    total = fixed + sum(g.bytes["int4"] for g in groups)
    if total > budget_bytes:
        raise ConfigError(
            f"weight budget {budget_bytes / MIB:.2f} MiB is below the all-int4 size "
            f"{total / MIB:.2f} MiB of this graph; raise --weight-budget-mib to at least that."
        )
    while True:
        best: tuple[float, Group, str] | None = None
        for g in groups:
            i = LEVELS.index(g.level)
            if i + 1 == len(LEVELS):
                continue
            up = LEVELS[i + 1]
            extra = g.bytes[up] - g.bytes[g.level]
            gain = g.kl[g.level] - g.kl[up]
            if total + extra > budget_bytes or gain <= 0:
                continue
            ratio = gain / max(extra, 1)
            if best is None or ratio > best[0]:
                best = (ratio, g, up)
        if best is None:
            return total
        _, g, up = best
        total += g.bytes[up] - g.bytes[g.level]
        g.level = up


def mixed_precision(
    model: ir.Model, calibration: Calibration, budget_mib: float
) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Quantize `model` in place to the plan that fits `budget_mib`; counts and the table."""
    groups, fixed = groups_of(model)
    sensitivities(model, groups, calibration)
    total = plan(groups, fixed, int(budget_mib * MIB))
    int8 = {w for g in groups if g.level == "int8" for w in g.weights}
    int4 = {w for g in groups if g.level == "int4" for w in g.weights}
    if int8:
        _quantize(model, int8, 8)
    counts: dict[str, int] = {}
    if int4:
        counts, _ = calibrated_int4(model, calibration, only=int4)
    counts = {
        "groups": len(groups),
        **{f"groups_{level}": sum(g.level == level for g in groups) for level in LEVELS},
        "planned_weight_bytes": int(total),
        "budget_bytes": int(budget_mib * MIB),
        "peak_group_bytes": counts.get("peak_group_bytes", 0),
    }
    return counts, [g.row() for g in groups]


class MixedPrecisionPass(CalibratedPass):
    """int4 / int8 / float per MatMul group, least KL within `--weight-budget-mib`."""

    name = "mixed-int4-int8"
    quantizes = True  # judged by the int4 tolerance (optimize/passes.py)

    usage = "kiln compress ARTIFACT --method mixed --calibration FILE --weight-budget-mib MIB"

    def __init__(self, calibration: Calibration | None = None, budget_mib: float | None = None):
        super().__init__(calibration)
        self.budget_mib = budget_mib
        self.table: list[dict[str, Any]] = []

    @classmethod
    def for_model(cls, config: Mapping[str, Any]) -> GraphPass:
        """Calibration and budget from the pass config (`kiln compress --method mixed`)."""
        budget = config.get("weight_budget_mib")
        return cls(Calibration.from_config(config), float(budget) if budget else None)

    def requires(self, value: ir.Model) -> None:
        """The calibration (CalibratedPass) and the budget are both needed."""
        super().requires(value)
        if self.budget_mib is None:
            raise ConfigError(f"pass {self.name!r} needs a budget: run `{self.usage}`.")

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """Plan and quantize; notes hold one line per group (the per-layer table)."""
        assert self.calibration is not None and self.budget_mib is not None
        counts, self.table = mixed_precision(model, self.calibration, self.budget_mib)
        notes = [
            f"{r['precision']:5s} {'+'.join(r['weights'])} {r['shapes']}: "
            f"KL int4 {r['kl']['int4']:.3g}, int8 {r['kl']['int8']:.3g}; "
            f"bytes {r['bytes'][r['precision']]}"
            for r in self.table
        ]
        return Result(model, changed=True, counts=counts, notes=notes)


class MixedMatMulNBitsPass(MixedPrecisionPass):
    """The onnxruntime target's mixed plan: int4 and int8 groups as MatMulNBits."""

    name = "matmul-nbits-mixed"

    def run(self, model: ir.Model) -> Result[ir.Model]:
        """The plan, then DequantizeLinear -> MatMul pairs repacked into MatMulNBits."""
        before = op_counts(model)
        result = super().run(model)
        to_matmul_nbits(model)
        counts = {**result.counts, **count_delta(before, op_counts(model))}
        return Result(model, changed=True, counts=counts, notes=result.notes)
