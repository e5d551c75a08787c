"""Pruning and mixed precision through a real tune of the bundled model on the CPU.

A prune value makes `kiln prune`'s smaller model, exported and judged against the unpruned fp32
export; `method = mixed` runs optimize/mixed.py with the budget tune/make.py derives; both are
cached trials (a rerun computes nothing) and without calibration text both are dropped by rule.
"""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from kiln.evaluate import EvalOptions
from kiln.tune import TuneResult, tune_model
from kiln.tune.recipe import Budget, Recipe, Workload

pytestmark = pytest.mark.slow

PROXY = EvalOptions(tokens=128, window=64, stride=32, prompts=1, greedy_tokens=8)
FULL = EvalOptions(tokens=256, window=128, stride=64, prompts=1, greedy_tokens=8)
LOOSE = Budget(max_kl_mean=10.0, min_top1=0.0, min_greedy=0.0, max_ppl_increase=10.0)
PRUNE = 0.090909  # the bundled model's 352 MLP channels: 32 cut, 320 (10 groups of 32) kept
RECIPE = Recipe(
    budget=LOOSE,
    workload=Workload(prompt_tokens=16, output_tokens=8),
    search={
        "precision": ("int8", "int4"),
        "method": ("rtn", "mixed"),
        "sparsity": ("dense",),
        "prune": (0.0, PRUNE),
        "fusions": (True,),
        "kv": ("static",),
        "threads": (1,),
    },
)


def _tune(root: Path, calibration: Path | None) -> TuneResult:
    from kiln.models.zen import ZEN_DIR

    return tune_model(
        ZEN_DIR, "cpu", recipe=RECIPE, out=root / "zen" / "cpu", text=root / "zen.txt",
        repeats=2, proxy=PROXY, full=FULL, calibration=calibration,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TuneResult]:
    from kiln.models.zen import zen_text

    root = tmp_path_factory.mktemp("prune-mixed")
    (root / "zen.txt").write_text(zen_text())
    (root / "train.txt").write_text(inspect.getsource(textwrap))
    return root, _tune(root, root / "train.txt")


def _by_label(result: TuneResult) -> dict[str, Any]:
    return {t.candidate.label(): t for t in result.trials}


def test_the_pruned_candidate_is_the_pruned_model_judged_against_the_original(
    tuned: tuple[Path, TuneResult],
) -> None:
    root, result = tuned
    trials = _by_label(result)
    pruned = trials["int8 rtn dense mlp0.090909 fused static s1 t1"]
    whole = trials["int8 rtn dense fused static s1 t1"]
    assert pruned.status in ("accepted", "chosen") and pruned.full is not None
    hf = root / "zen" / "artifacts" / "hf-prune-layers0-kv_groups0-mlp0.090909"
    assert json.loads((hf / "config.json").read_text())["intermediate_size"] == 320
    record = json.loads((hf / "prune.json").read_text())
    assert record["calibration"]["file"] == str(root / "train.txt")  # never the eval text
    # cutting channels costs more than int8 rounding alone, and the eval sees it
    assert whole.full is not None
    assert math.isfinite(pruned.full["kl_mean"]) and pruned.full["kl_mean"] > whole.full["kl_mean"]
    assert pruned.artifact != whole.artifact
    # rule prune-scope: int4 round-to-nearest is not pruned (int4 is pruned after gptq only)
    assert trials["int4 rtn dense mlp0.090909 fused static s1 t1"].rule == "prune-scope"


def test_mixed_runs_with_the_derived_budget(tuned: tuple[Path, TuneResult]) -> None:
    from kiln.tune.make import mixed_budget_mib

    root, result = tuned
    mixed = _by_label(result)["int4 mixed dense fused static s1 t1"]
    assert mixed.full is not None and mixed.optimize is not None
    exports = sorted((root / "zen" / "artifacts").glob("export-static-*"))
    export = next(p for p in exports if "prune" not in p.name)
    budget = mixed_budget_mib(export, "onnxruntime")
    assert mixed.optimize.weight_budget_mib == budget
    manifest = json.loads((Path(mixed.artifact) / "optimize.json").read_text())
    text = json.dumps(manifest)
    assert "matmul-nbits-mixed" in text and str(int(budget * 2**20)) in text
    data = json.loads((root / "zen" / "cpu" / "tune.json").read_text())
    row = next(c for c in data["candidates"] if c["key"] == mixed.candidate.key)
    assert row["optimize"]["weight_budget_mib"] == budget
    assert all(c["optimize"]["weight_budget_mib"] is None for c in data["candidates"]
               if c["optimize"] and c["recipe"]["method"] != "mixed")  # fmt: skip


def test_rerun_computes_nothing_and_chooses_the_same(tuned: tuple[Path, TuneResult]) -> None:
    root, first = tuned
    again = _tune(root, root / "train.txt")
    assert again.summary["trials"]["computed"] == 0
    assert again.summary["chosen"] == first.summary["chosen"]


def test_without_text_prune_and_mixed_are_dropped_by_rule(
    tuned: tuple[Path, TuneResult],
) -> None:
    root, _ = tuned
    result = _tune(root, None)  # the same trial cache: the rtn graphs are reused
    for t in result.trials:
        if t.candidate["method"] == "mixed" and t.candidate["precision"] == "int4":
            assert t.rule in ("needs-calibration", "prune-scope"), t.candidate.label()
        if t.candidate["prune"] and t.candidate["method"] == "rtn":
            assert t.rule == "needs-calibration", t.candidate.label()
    # the negative control: the round-to-nearest, unpruned graphs still run
    assert any(t.status in ("accepted", "chosen") for t in result.trials)


def test_a_chosen_mixed_recipe_replays_through_kiln_optimize(
    tuned: tuple[Path, TuneResult],
) -> None:
    """recipe.toml carries the weight budget: `kiln optimize --recipe` remakes the same graph."""
    import subprocess
    import sys
    from dataclasses import replace

    from kiln.artifacts import sha256_file
    from kiln.models.zen import ZEN_DIR

    root, _ = tuned
    out = root / "zen" / "mixed-only"  # beside cpu/: the same trial cache
    search = {**RECIPE.search, "precision": ("int4",), "method": ("mixed",), "prune": (0.0,)}
    result = tune_model(
        ZEN_DIR, "cpu", recipe=replace(RECIPE, search=search), out=out, text=root / "zen.txt",
        repeats=2, proxy=PROXY, full=FULL, calibration=root / "train.txt",
    )  # fmt: skip
    assert result.chosen is not None and result.chosen.candidate["method"] == "mixed"
    assert "weight_budget_mib = " in (out / "recipe.toml").read_text()
    export = next(
        p for p in (root / "zen" / "artifacts").glob("export-static-*") if "prune" not in p.name
    )
    cmd = [sys.executable, "-m", "kiln", "optimize", str(export), "--recipe"]
    cmd += [str(out / "recipe.toml"), "--out", str(root / "replay"), "--no-torch-check"]
    subprocess.run(cmd, check=True, capture_output=True)
    tuned_sha = sha256_file(Path(result.chosen.artifact) / "model.onnx")
    assert sha256_file(root / "replay" / "model.onnx") == tuned_sha
