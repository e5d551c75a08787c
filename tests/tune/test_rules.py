"""Each pruning rule fires on its case and stays quiet on a near miss (the negative control)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from kiln.engine.profiles import load_profile
from kiln.tune.recipe import Workload
from kiln.tune.rules import RULES, first_violation
from kiln.tune.space import KNOB_NAMES, Candidate, Context, ModelShape, Target

SHAPE = ModelShape(
    layers=2, hidden=256, intermediate=512, kv_heads=2, head_dim=64, vocab=300, max_positions=512
)
BASE = {
    "precision": "fp16",
    "method": "rtn",
    "sparsity": "dense",
    "fusions": True,
    "kv": "concat",
    "slots": 1,
    "threads": 0,
}


def cand(**kw: Any) -> Candidate:
    d = {**BASE, **kw}
    return Candidate(tuple((k, d[k]) for k in KNOB_NAMES))


def gpu(name: str = "rtx-ampere-ada-fp16", **kw: Any) -> Context:
    return Context(Target(name, profile=replace(load_profile(name), **kw)), Workload(), SHAPE)


def cpu(cores: int = 2) -> Context:
    return Context(Target("cpu", cores=cores), Workload(), SHAPE)


SM75 = {"compute_capabilities": ("7.5",)}
# rule id -> (a candidate and context it drops, a near miss it keeps)
CASES: dict[str, tuple[tuple[Candidate, Context], tuple[Candidate, Context]]] = {
    "precision-not-offered": ((cand(threads=1), cpu()), (cand(precision="int8", threads=1), cpu())),
    "compute-capability": (
        (cand(precision="fp8"), gpu()),
        (cand(precision="fp8"), gpu("rtx-ada-fp8")),
    ),
    "method-needs-int-weights": (
        (cand(method="awq"), gpu()),
        (cand(precision="int4", method="awq"), gpu()),
    ),
    "sparsity-target": ((cand(sparsity="2:4"), gpu(**SM75)), (cand(sparsity="2:4"), gpu())),
    "sparsity-gemm-size": (
        (cand(sparsity="2:4"), Context(gpu().target, Workload(), replace(SHAPE, hidden=128))),
        (cand(sparsity="2:4"), gpu()),
    ),
    "pass-not-available": (
        (cand(precision="int4", method="awq"), gpu()),
        (cand(precision="int4"), gpu()),
    ),
    "weight-blocks": (
        (cand(precision="int8"), Context(gpu().target, Workload(), replace(SHAPE, hidden=100))),
        (cand(), Context(gpu().target, Workload(), replace(SHAPE, hidden=100))),
    ),
    "int4-large-batch": (
        (cand(precision="int4", slots=8), gpu()),
        (cand(precision="int4", slots=4), gpu()),
    ),
    "slots-exceed-profile": ((cand(slots=64), gpu()), (cand(slots=4), gpu())),
    "threads": (
        (cand(precision="fp32", threads=4), cpu()),
        (cand(precision="fp32", threads=2), cpu()),
    ),
    "context": (
        (cand(), Context(gpu().target, Workload(prompt_tokens=500, output_tokens=64), SHAPE)),
        (cand(), Context(gpu().target, Workload(prompt_tokens=400, output_tokens=64), SHAPE)),
    ),
}


def test_every_rule_has_a_case() -> None:
    assert set(CASES) == {r.id for r in RULES}


@pytest.mark.parametrize("rule_id", list(CASES))
def test_rule_fires_and_keeps_the_near_miss(rule_id: str) -> None:
    rule = next(r for r in RULES if r.id == rule_id)
    (bad, bad_ctx), (good, good_ctx) = CASES[rule_id]
    why = rule.check(bad, bad_ctx)
    assert why, f"{rule_id} should drop {bad.label()}"
    assert rule.check(good, good_ctx) is None, f"{rule_id} dropped {good.label()}: {why}"


def test_rules_derive_from_the_precision_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lowering fp8's minimum compute capability in kiln/precisions.py lets it onto SM86."""
    from kiln import precisions

    fp8 = precisions.PRECISIONS["fp8"]
    assert first_violation(cand(precision="fp8"), gpu())[0] == "compute-capability"  # type: ignore[index]
    monkeypatch.setitem(precisions.PRECISIONS, "fp8", replace(fp8, min_compute_capability=8.6))
    assert first_violation(cand(precision="fp8"), gpu()) is None


def test_registering_a_pass_makes_the_method_live(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.optimize import passes

    c = cand(precision="int4", method="awq")
    assert first_violation(c, gpu())[0] == "pass-not-available"  # type: ignore[index]
    monkeypatch.setitem(passes.PASSES, "int4-awq", passes.PASSES["int4-weight-only"])
    assert first_violation(c, gpu()) is None


def test_bf16_needs_ampere() -> None:
    assert first_violation(cand(precision="bf16"), gpu(**SM75))[0] == "compute-capability"  # type: ignore[index]
    assert first_violation(cand(precision="bf16"), gpu("a100-bf16")) is None
