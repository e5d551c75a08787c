"""Each pruning rule fires on its case and stays quiet on a near miss (the negative control)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kiln.engine.profiles import load_profile
from kiln.tune import space
from kiln.tune.recipe import Workload
from kiln.tune.rules import RULES, first_violation
from kiln.tune.space import KNOB_NAMES, Candidate, Context, ModelShape, Target

SHAPE = ModelShape(
    layers=2,
    hidden=256,
    intermediate=512,
    kv_heads=2,
    head_dim=64,
    vocab=300,
    max_positions=512,
    family="llama",
)
BASE = {
    "precision": "fp16",
    "method": "rtn",
    "sparsity": "dense",
    "prune": 0.0,
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
TEXT = {"calibration": Path("train.txt")}
GPT2 = replace(SHAPE, family="gpt2")
INT8 = {"precision": "int8", "threads": 1, "kv": "static"}
# rule id -> (a candidate and context it drops, a near miss it keeps)
CASES: dict[str, tuple[tuple[Candidate, Context], tuple[Candidate, Context]]] = {
    "precision-not-offered": ((cand(threads=1), cpu()), (cand(precision="int8", threads=1), cpu())),
    "compute-capability": (
        (cand(precision="fp8"), gpu()),
        (cand(precision="fp8"), gpu("rtx-ada-fp8")),
    ),
    "method-needs-int-weights": (
        (cand(method="gptq"), gpu()),
        (cand(precision="int4", method="gptq"), gpu()),
    ),
    "method-precision": (
        (cand(precision="int8", method="gptq"), gpu()),
        (cand(precision="int4", method="gptq"), gpu()),
    ),
    "sparsity-target": ((cand(sparsity="2:4"), gpu(**SM75)), (cand(sparsity="2:4"), gpu())),
    "sparsity-gemm-size": (
        (cand(sparsity="2:4"), Context(gpu().target, Workload(), replace(SHAPE, hidden=128))),
        (cand(sparsity="2:4"), gpu()),
    ),
    "sparsity-float-weights": (
        (cand(precision="int4", sparsity="2:4"), gpu()),
        (cand(sparsity="2:4"), gpu()),
    ),
    # "awq" is a knob value whose method optimize/methods.py lacks (FAKE_METHOD below)
    "pass-not-available": (
        (cand(precision="int4", method="awq"), gpu()),
        (cand(precision="int4", method="gptq"), gpu()),
    ),
    "needs-calibration": (
        (cand(precision="int4", method="gptq"), gpu()),
        (cand(precision="int4", method="gptq"), replace(gpu(), calibration=Path("train.txt"))),
    ),
    "prune-family": (
        (cand(prune=0.125, **INT8), Context(Target("cpu", cores=2), Workload(), GPT2, **TEXT)),
        (cand(prune=0.0, **INT8), Context(Target("cpu", cores=2), Workload(), GPT2, **TEXT)),
    ),
    # 512 channels: 0.125 cuts 64 (keeps 448 = 14 groups of 32); 0.1 cuts 51 (keeps 461)
    "prune-channel-group": (
        (cand(prune=0.1, **INT8), replace(cpu(), **TEXT)),
        (cand(prune=0.125, **INT8), replace(cpu(), **TEXT)),
    ),
    "prune-scope": (
        (cand(prune=0.125, **{**INT8, "kv": "concat"}), replace(cpu(), **TEXT)),
        (cand(prune=0.125, **INT8), replace(cpu(), **TEXT)),
    ),
    "mixed-scope": (
        (cand(precision="int4", method="mixed", fusions=False), replace(gpu(), **TEXT)),
        (cand(precision="int4", method="mixed"), replace(gpu(), **TEXT)),
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


FAKE_METHOD = ("awq", "awq-int4")  # a knob value -> a METHODS key that does not exist


@pytest.fixture(autouse=True)
def fake_method(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(space.METHOD_KNOB, *FAKE_METHOD)


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


def test_registering_a_method_and_its_pass_makes_the_knob_value_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kiln.optimize import methods, passes

    c, ctx = cand(precision="int4", method="awq"), gpu()
    assert first_violation(c, ctx)[0] == "pass-not-available"  # type: ignore[index]
    record = methods.Method("int4", {"tensorrt": "int4-awq"}, replaces=True, calibrated=False)
    monkeypatch.setitem(methods.METHODS, FAKE_METHOD[1], record)
    why = first_violation(c, ctx)
    assert why is not None and why[0] == "pass-not-available" and "'int4-awq'" in why[1]
    monkeypatch.setitem(passes.PASSES, "int4-awq", passes.PASSES["int4-weight-only"])
    assert first_violation(c, ctx) is None


def test_the_landed_methods_are_live_with_calibration_text() -> None:
    """gptq and both 2:4 values pass every rule where their target and precision allow."""
    ctx = replace(gpu(), calibration=Path("train.txt"))
    for c in (cand(precision="int4", method="gptq"), cand(sparsity="2:4-calibrated")):
        assert first_violation(c, ctx) is None, c.label()
    cpu_ctx = replace(cpu(), calibration=Path("train.txt"))
    assert first_violation(cand(precision="int4", method="gptq", threads=1), cpu_ctx) is None
    assert first_violation(cand(precision="fp32", sparsity="2:4", threads=1), cpu_ctx)[0] == (  # type: ignore[index]
        "sparsity-target"
    )


@pytest.mark.parametrize(
    ("c", "target", "method"),
    [
        (cand(precision="int4", method="gptq"), "tensorrt", "gptq-int4"),
        (cand(precision="int4", method="gptq", threads=1), "cpu", "gptq-int4"),
        (cand(sparsity="2:4"), "tensorrt", "sparse24"),
        (cand(sparsity="2:4-calibrated"), "tensorrt", "sparse24-calibrated"),
    ],
)
def test_the_graph_runs_the_passes_kiln_compress_runs(
    c: Candidate, target: str, method: str
) -> None:
    """With fusions on, tune's pass list is optimize/methods.py method_passes' for that method."""
    from kiln.optimize.methods import method_passes
    from kiln.tune.make import optimize_section

    ctx = cpu() if target == "cpu" else gpu()
    section = optimize_section(c, ctx)
    precision, names = method_passes(method, ctx.target.optimize_target)
    assert (section.precision, list(section.passes)) == (precision, names)
    rtn = optimize_section(cand(**{**c.as_dict(), "method": "rtn", "sparsity": "dense"}), ctx)
    assert rtn.passes == ()  # negative control: round-to-nearest keeps the default list


def test_bf16_needs_ampere() -> None:
    assert first_violation(cand(precision="bf16"), gpu(**SM75))[0] == "compute-capability"  # type: ignore[index]
    assert first_violation(cand(precision="bf16"), gpu("a100-bf16")) is None


def test_pruning_needs_text_and_leaves_whole_layers() -> None:
    """needs-calibration covers pruning; a cut of every layer is dropped, one layer less is not."""
    c = cand(prune=0.125, **INT8)
    assert first_violation(c, cpu())[0] == "needs-calibration"  # type: ignore[index]
    ctx = replace(cpu(), **TEXT)
    assert first_violation(c, ctx) is None
    all_layers = first_violation(cand(prune="layers=0.9", **INT8), ctx)
    assert all_layers is not None and all_layers[0] == "prune-channel-group"
    assert "0 layers" in all_layers[1]
    assert first_violation(cand(prune="layers=0.5", **INT8), ctx) is None


def test_pruned_shape_feeds_the_weight_block_rule() -> None:
    """On tensorrt, int8's blocks must divide the pruned intermediate size, not the original."""
    shape = replace(SHAPE, intermediate=384)  # 0.083333 keeps 352 = 11 x 32: blocks of 32 fit
    ctx = Context(gpu().target, Workload(), shape, Path("train.txt"))
    assert first_violation(cand(precision="int8", prune=0.083333), ctx) is None
    bad = first_violation(cand(precision="int8", prune="mlp=0.1"), ctx)
    assert bad is not None and bad[0] == "prune-channel-group"


def test_default_prune_values_snap_to_channel_groups() -> None:
    """~10% and ~20% of the MLP channels, whole 32-channel groups, and 0; deterministic."""
    from kiln.tune.space import KNOBS, pruned_shape

    knob = next(k for k in KNOBS if k.name == "prune")
    ctx = Context(Target("cpu", cores=2), Workload(), replace(SHAPE, intermediate=384))
    values = knob.values(ctx)
    assert values == knob.values(ctx) and values[0] == 0.0 and len(values) == 3
    for v in values[1:]:
        kept = pruned_shape(ctx.shape, v).intermediate
        assert kept % 32 == 0 and 0 < kept < 384


def test_prune_values_parse_and_refuse_typos() -> None:
    from kiln.errors import ConfigError
    from kiln.tune.space import prune_spec

    assert prune_spec(0.25).mlp == 0.25
    assert prune_spec("layers=0.25,mlp=0.1").layers == 0.25
    with pytest.raises(ConfigError, match="keys layers, kv_groups, mlp"):
        prune_spec("layer=0.25")


def test_the_cache_key_covers_the_new_knobs() -> None:
    """prune and method=mixed change the candidate key and the graph's knobs; equal knobs agree."""
    base = cand(**INT8)
    assert base.key == cand(**INT8).key
    pruned = cand(prune=0.125, **INT8)
    mixed = cand(precision="int4", method="mixed", threads=1)
    keys = {base.key, pruned.key, mixed.key, cand(precision="int4", threads=1).key}
    assert len(keys) == 4
    assert pruned.artifact_knobs["prune"] == 0.125 and base.artifact_knobs["prune"] == 0.0


def test_mixed_runs_the_mixed_pass_of_kiln_compress() -> None:
    """method = mixed is optimize/methods.py `mixed` (its pass per target), and needs text."""
    from kiln.optimize.methods import method_passes
    from kiln.tune.make import optimize_section

    c = cand(precision="int4", method="mixed", threads=1, kv="static")
    assert first_violation(c, cpu())[0] == "needs-calibration"  # type: ignore[index]
    on_gpu = cand(precision="int4", method="mixed")
    for ctx, one in ((replace(cpu(), **TEXT), c), (replace(gpu(), **TEXT), on_gpu)):
        assert first_violation(one, ctx) is None
        section = optimize_section(one, ctx)
        assert list(section.passes) == method_passes("mixed", ctx.target.optimize_target)[1]
    assert first_violation(cand(precision="int8", method="mixed"), replace(gpu(), **TEXT))[0] == (  # type: ignore[index]
        "method-precision"
    )
