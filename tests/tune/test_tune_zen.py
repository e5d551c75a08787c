"""`kiln tune` end to end on the bundled model: outputs, resume, an impossible budget, replay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kiln.artifacts import sha256_file
from kiln.cli import main
from kiln.tune.recipe import load_recipe

pytestmark = pytest.mark.slow


def test_every_candidate_is_recorded_and_the_choice_is_within_budget(zen_tune: Any) -> None:
    data = json.loads((zen_tune.out / "tune.json").read_text())
    statuses = {c["status"] for c in data["candidates"]}
    assert statuses <= {"pruned", "rejected", "accepted", "chosen"}
    assert all(c["rule"] for c in data["candidates"] if c["status"] in ("pruned", "rejected"))
    chosen = [c for c in data["candidates"] if c["status"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["key"] == data["chosen"]
    assert chosen[0]["full"]["kl_mean"] <= data["budget"]["max_kl_mean"]
    assert chosen[0]["speed"]["measured"] and len(chosen[0]["speed"]["samples"]) == 3
    for name in ("recipe.toml", "report.md", "pareto.png"):
        assert (zen_tune.out / name).is_file()
    recipe = load_recipe(zen_tune.out / "recipe.toml")
    assert (
        recipe.optimize is not None
        and recipe.optimize.precision == chosen[0]["recipe"]["precision"]
    )


def test_rerun_computes_nothing_and_chooses_the_same(zen_tune: Any) -> None:
    again = zen_tune.again()
    assert again.summary["trials"]["computed"] == 0
    assert again.summary["trials"]["reused"] > 0
    assert again.summary["chosen"] == zen_tune.first.summary["chosen"]


def test_an_interrupted_tune_continues(zen_tune: Any) -> None:
    """A trial that never finished (its file missing) is the only one computed again."""
    trials = zen_tune.out.parent / "trials"
    victim = sorted(trials.glob("full-*.json"))[0]
    victim.unlink()
    again = zen_tune.again()
    assert again.summary["trials"]["computed"] == 1
    assert victim.is_file()
    assert again.summary["chosen"] == zen_tune.first.summary["chosen"]


def test_an_impossible_budget_exits_1_naming_the_closest(
    zen_tune: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.models.zen import ZEN_DIR

    out = zen_tune.out.parent / "impossible"
    argv = ["tune", str(ZEN_DIR), "--target", "cpu", "--recipe", str(zen_tune.recipe)]
    argv += ["--text", str(zen_tune.text), "--out", str(out), "--budget", "max_kl_mean=1e-30"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no candidate" in err and "meets the budget" in err and "closest:" in err
    data = json.loads((out / "tune.json").read_text())
    assert data["chosen"] is None and not (out / "recipe.toml").exists()
    assert all(c["status"] in ("pruned", "rejected") for c in data["candidates"])


def test_the_chosen_recipe_replays_through_kiln_optimize(zen_tune: Any) -> None:
    chosen = next(t for t in zen_tune.first.trials if t.status == "chosen")
    export = zen_tune.out.parent / "artifacts" / "export-concat"
    replay = zen_tune.root / "replay"
    cmd = [sys.executable, "-m", "kiln", "optimize", str(export), "--recipe"]
    cmd += [str(zen_tune.out / "recipe.toml"), "--out", str(replay), "--no-torch-check"]
    subprocess.run(cmd, check=True, capture_output=True)
    tuned = sha256_file(Path(chosen.artifact) / "model.onnx")
    assert sha256_file(replay / "model.onnx") == tuned
