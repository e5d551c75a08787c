"""Recipe TOML round trip and errors; the choice, ties, Pareto front and rank agreement."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest

from kiln.errors import ConfigError
from kiln.tune.choose import choose, closest, pareto, rank_agreement
from kiln.tune.recipe import (
    Budget,
    BuildSection,
    ExportSection,
    OptimizeSection,
    Recipe,
    RuntimeSection,
    load_recipe,
    override,
    save_recipe,
)
from kiln.tune.search import Trial
from kiln.tune.space import KNOB_NAMES, Candidate
from kiln.tune.speed import tied


def test_recipe_round_trip(tmp_path: Path) -> None:
    r = Recipe(
        target="rtx-ampere-ada-fp16",
        budget=Budget(max_kl_mean=1e-3),
        search={"precision": ("fp16", "int8")},
        optimize=OptimizeSection("tensorrt", "int8", skip=("rms-norm",)),
        build=BuildSection("rtx-ampere-ada-fp16", "int8"),
        runtime=RuntimeSection(threads=0, slots=4),
    )
    assert load_recipe(save_recipe(r, tmp_path / "r.toml", header="a\nb")) == r
    mixed = replace(
        r,
        export=ExportSection("static", 96, prune="layers=0,kv_groups=0,mlp=0.1"),
        optimize=OptimizeSection("onnxruntime", "int4", weight_budget_mib=3.25),
        search={"prune": (0.0, 0.1, "layers=0.25,mlp=0.1"), "method": ("mixed",)},
    )
    assert load_recipe(save_recipe(mixed, tmp_path / "m.toml")) == mixed


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[budget]\nmax_kl = 1\n", r"\[budget\] max_kl = 1: unknown key"),
        ('[budget]\nmin_top1 = "high"\n', r"\[budget\] min_top1 = 'high': must be float"),
        ("[workload]\nconcurrency = 1.5\n", r"concurrency = 1.5: must be int"),
        ("[search]\nprecision = 'fp16'\n", r"\[search\]: each key must name a knob"),
        ("colour = 1\n", r"colour: unknown key"),
        ('[optimize]\nweight_budget_mib = "3"\n', r"weight_budget_mib = '3': must be float"),
    ],
)
def test_recipe_errors_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_recipe(path)


def test_command_line_overrides() -> None:
    r = override(Recipe(), "budget", ["max_kl_mean=0.1", "min-top1=0.5"])
    assert (r.budget.max_kl_mean, r.budget.min_top1) == (0.1, 0.5)
    with pytest.raises(ConfigError, match="KEY one of"):
        override(r, "workload", ["batch=4"])


def test_budget_deficits() -> None:
    b = Budget(max_kl_mean=1e-3, min_top1=0.9, min_greedy=0.9, max_ppl_increase=0.01)
    ok = {"kl_mean": 5e-4, "top1_agreement": 0.95, "greedy_agreement": 1.0, "ppl_increase": 0.0}
    assert b.deficits(ok) == {}
    bad = {**ok, "kl_mean": 3e-3, "top1_agreement": 0.8}
    assert b.deficits(bad) == pytest.approx({"kl_mean": 2e-3, "top1": 0.1})
    assert b.deficits(bad, slack=3.0) == {}  # 3x the margins: 3e-3 KL, 0.3 top-1 error


def _trial(precision: str, speeds: list[float], kl: float) -> Trial:
    values = {"precision": precision, "method": "rtn", "sparsity": "dense", "prune": 0.0}
    values |= {"fusions": True}
    values |= {"kv": "concat", "slots": 1, "threads": 1}
    t = Trial(Candidate(tuple((k, values[k]) for k in KNOB_NAMES)), status="accepted")
    t.full = {"kl_mean": kl}
    t.speed = {"tokens_per_s": sorted(speeds)[len(speeds) // 2], "samples": speeds}
    return t


def test_choice_is_the_fastest_and_ignores_order() -> None:
    trials = [
        _trial("fp32", [100, 90, 110, 95, 105], 0.0),
        _trial("int8", [150, 140, 160, 145, 155], 1e-5),
        _trial("int4", [200, 190, 210, 195, 205], 1e-3),
    ]
    for seed in range(5):
        random.Random(seed).shuffle(trials)
        chosen, ties = choose(trials)
        assert chosen is not None and chosen.candidate["precision"] == "int4"
        assert [t.candidate["precision"] for t in ties] == ["int4"]


def test_ties_go_to_the_lower_kl() -> None:
    a = _trial("int8", [150, 120, 180, 140, 160], 1e-5)
    b = _trial("int4", [155, 175, 125, 150, 145], 1e-3)  # per-repeat ratios straddle 1
    assert tied(a.speed, b.speed)  # type: ignore[arg-type]
    chosen, ties = choose([b, a])
    assert chosen is a and len(ties) == 2
    c = _trial("int4", [300, 240, 360, 280, 320], 1e-3)  # negative control: 2x every repeat
    assert not tied(a.speed, c.speed)  # type: ignore[arg-type]


def test_closest_is_the_smallest_relative_deficit() -> None:
    a, b = _trial("int8", [1], 1e-2), _trial("int4", [1], 1e-1)
    a.deficit, b.deficit = {"kl_mean": 5e-3}, {"kl_mean": 9e-2, "top1": 0.2}
    assert closest([b, a], Budget()) is a


def test_pareto_front() -> None:
    pts = [(100.0, 0.0), (150.0, 1e-5), (140.0, 1e-3), (200.0, 1e-3)]
    assert pareto(pts) == [0, 1, 3]  # (140, 1e-3) is beaten by (150, 1e-5)


def test_rank_agreement() -> None:
    assert rank_agreement([1, 2, 3, 4], [10, 20, 30, 40])["kendall"] == pytest.approx(1.0)
    assert rank_agreement([1, 2, 3, 4], [40, 30, 20, 10])["spearman"] == pytest.approx(-1.0)
    assert rank_agreement([1, 2], [1, 2])["spearman"] is None


def test_measure_without_the_gpu_says_where_to_run() -> None:
    """`kiln tune --measure` on a host without the profile's GPU stops with what to do."""
    from types import SimpleNamespace

    from kiln.engine.profiles import load_profile
    from kiln.errors import KilnError
    from kiln.tune.measure import gpu_compute_capability, measure_engines

    if gpu_compute_capability() in ("8.6", "8.9"):
        pytest.skip("this host has a GPU of the profile: --measure would run")
    target = SimpleNamespace(profile=load_profile("rtx-ampere-ada-fp16"))
    s = SimpleNamespace(ctx=SimpleNamespace(target=target))
    with pytest.raises(KilnError, match=r"--measure .*rtx-ampere-ada-fp16.*(has none|cannot run)"):
        measure_engines(s, [])  # type: ignore[arg-type]


def test_only_candidates_faster_than_the_fp32_export_compete() -> None:
    base = {"tokens_per_s": 100.0, "samples": [100, 100, 100, 100, 100]}
    same = _trial("fp32", [150, 90, 140, 95, 135], 0.0)  # vs base: q25 0.95, no clear gain
    fast = _trial("int8", [130, 125, 135, 128, 132], 1e-5)  # faster in every repeat
    assert choose([same, fast])[0] is same  # tied with each other: the lower KL wins ...
    assert choose([same, fast], base)[0] is fast  # ... unless it does not beat the export
    assert choose([same], base)[0] is same  # nothing beats it: the choice falls back to all
