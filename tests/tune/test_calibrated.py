"""Calibrated methods through a real tune of the bundled model on the CPU.

gptq (optimize/methods.py gptq-int4) is built and evaluated like round-to-nearest; its
calibration text keys its trials (a new text remakes the gptq graph, never the rtn one); and
without calibration text the rule drops it (the negative control).
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest

from kiln.evaluate import EvalOptions
from kiln.tune import tune_model
from kiln.tune.recipe import Budget, Recipe, Workload

PROXY = EvalOptions(tokens=128, window=64, stride=32, prompts=1, greedy_tokens=8)
FULL = EvalOptions(tokens=256, window=128, stride=64, prompts=1, greedy_tokens=8)
# Loose: both graphs reach the full eval and the timing, whatever int4 costs this model.
LOOSE = Budget(max_kl_mean=10.0, min_top1=0.0, min_greedy=0.0, max_ppl_increase=10.0)
RECIPE = Recipe(
    budget=LOOSE,
    workload=Workload(prompt_tokens=16, output_tokens=8),
    search={
        "precision": ("int4",),
        "method": ("rtn", "gptq"),
        "sparsity": ("dense",),
        "prune": (0.0,),
        "fusions": (True,),
        "kv": ("concat",),
        "threads": (1,),
    },
)


@pytest.fixture(scope="module")
def zen(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """The model, its eval text, and a calibration text that is not the eval text."""
    from kiln.models.zen import ZEN_DIR, zen_text

    root = tmp_path_factory.mktemp("calibrated")
    (root / "zen.txt").write_text(zen_text())
    (root / "train.txt").write_text(inspect.getsource(textwrap))
    return ZEN_DIR, root / "zen.txt", root / "train.txt"


def _tune(zen: tuple[Path, Path, Path], out: Path, calibration: Path | None) -> dict[str, dict]:  # type: ignore[type-arg]
    model, text, _ = zen
    result = tune_model(
        model, "cpu", recipe=RECIPE, out=out, text=text, repeats=2, proxy=PROXY, full=FULL,
        calibration=calibration,
    )  # fmt: skip
    return {t.candidate["method"]: t.__dict__ | {"key": t.candidate.key} for t in result.trials}


def test_gptq_is_built_evaluated_and_keyed_by_its_calibration(
    zen: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "zen" / "cpu"
    first = _tune(zen, out, zen[2])
    gptq, rtn = first["gptq"], first["rtn"]
    assert gptq["status"] in ("accepted", "chosen"), (gptq["rule"], gptq["reason"])
    assert gptq["full"] is not None and gptq["speed"] is not None
    manifest = json.loads((Path(gptq["artifact"]) / "optimize.json").read_text())
    text = json.dumps(manifest)
    assert "matmul-nbits-int4-gptq" in text and 'matmul-nbits-int4"' not in text
    assert "matmul-nbits-int4-gptq" not in (Path(rtn["artifact"]) / "optimize.json").read_text()
    # GPTQ moves the weights: its graph and figures differ from round-to-nearest's.
    assert gptq["full"]["kl_mean"] != rtn["full"]["kl_mean"]

    other = zen[2].with_name("train2.txt")
    other.write_text(inspect.getsource(json))
    before = {p.name for p in (out.parent / "trials").glob("optimize-*.json")}
    second = _tune(zen, out, other)
    after = {p.name for p in (out.parent / "trials").glob("optimize-*.json")}
    assert len(after - before) == 1, "only the gptq graph is remade for a new calibration text"
    assert second["rtn"]["full"] == rtn["full"]
    assert second["gptq"]["full"] != gptq["full"]


def test_without_calibration_text_gptq_is_dropped_by_rule(
    zen: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    trials = _tune(zen, tmp_path / "zen" / "cpu", None)
    assert trials["gptq"]["status"] == "pruned" and trials["gptq"]["rule"] == "needs-calibration"
    assert trials["rtn"]["status"] in ("accepted", "chosen")


def test_calibrating_on_the_eval_text_is_refused(
    zen: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from kiln.errors import ConfigError

    with pytest.raises(ConfigError, match="held-out"):
        _tune(zen, tmp_path / "zen" / "cpu", zen[1])


def test_a_chosen_gptq_recipe_replays_through_kiln_optimize(
    zen: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """recipe.toml carries the calibration text: `kiln optimize --recipe` remakes the graph."""
    import subprocess
    import sys
    from dataclasses import replace

    from kiln.artifacts import sha256_file

    model, text, calibration = zen
    out = tmp_path / "zen" / "cpu"
    recipe = replace(RECIPE, search={**RECIPE.search, "method": ("gptq",)})
    result = tune_model(
        model, "cpu", recipe=recipe, out=out, text=text, repeats=2, proxy=PROXY, full=FULL,
        calibration=calibration,
    )  # fmt: skip
    assert result.chosen is not None and result.chosen.candidate["method"] == "gptq"
    assert f'calibration = "{calibration}"' in (out / "recipe.toml").read_text()
    export = out.parent / "artifacts" / "export-concat"
    cmd = [sys.executable, "-m", "kiln", "optimize", str(export), "--recipe"]
    cmd += [str(out / "recipe.toml"), "--out", str(tmp_path / "replay"), "--no-torch-check"]
    subprocess.run(cmd, check=True, capture_output=True)
    tuned = sha256_file(Path(result.chosen.artifact) / "model.onnx")
    assert sha256_file(tmp_path / "replay" / "model.onnx") == tuned


def test_the_eval_models_default_calibration_is_training_text(tmp_path: Path) -> None:
    """Training-split files of the eval corpus; no held-out file; no default for other models."""
    from kiln.models.train_eval import read_text, stdlib_root
    from kiln.models.zen import ZEN_DIR
    from kiln.tune import default_calibration

    model = Path(__file__).resolve().parents[2] / "models" / "eval-llama"
    path = default_calibration(model, tmp_path / "calibration.txt")
    assert path is not None and len(path.read_text()) > 10_000
    text = path.read_text()
    heldout = json.loads((model / "split.json").read_text())["heldout"]
    big = [h["path"] for h in heldout if len(read_text(stdlib_root(), h["path"])) > 2000]
    assert big and not any(read_text(stdlib_root(), p) in text for p in big)
    assert default_calibration(ZEN_DIR, tmp_path / "zen.txt") is None
