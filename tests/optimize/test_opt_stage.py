"""The optimize stage as a user meets it: CLI, artifact folder, reuse, budget, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from kiln.cli import main
from kiln.errors import ArtifactError, ConfigError, ParityError
from kiln.optimize import optimize_model
from kiln.optimize.base import GraphPass
from kiln.optimize.passes import PASSES
from kiln.steps import Result


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["optimize", "--help"])
    text = capsys.readouterr().out
    for opt in (
        "--out",
        "--precision",
        "--target",
        "--passes",
        "--skip",
        "--allow-drift",
        "--force",
        "--no-torch-check",
        "--list-passes",
    ):
        assert opt in text
    for p in ("fp16", "bf16", "int8", "int4", "fp8"):
        assert p in text


def test_artifact_is_shaped_like_an_export(optimized, exported):
    out = optimized("zen", "fp16")
    for name in (
        "model.onnx",
        "optimize.json",
        "export.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "export.json").read_bytes() == (exported("zen") / "export.json").read_bytes()
    m = json.loads((out / "optimize.json").read_text())
    assert m["kind"] == "kiln.optimize" and m["precision"] == "fp16"
    assert (
        m["source"]["model_sha256"]
        == json.loads((out / "export.json").read_text())["files"]["model.onnx"]["sha256"]
    )
    for record in m["passes"]:
        assert {"name", "counts", "elapsed_s", "drift", "within_budget"} <= set(record)
    assert {i["dtype"] for i in m["io"]["outputs"]} == {"float16"}
    assert m["engine_hints"]["attention_decomposable"] is False


def test_current_artifact_is_reused_and_force_redoes_it(optimized, exported, tmp_path):
    src = exported("llama")
    out = optimize_model(src, tmp_path / "o", precision="fp16", check_torch=False)
    stamp = (out / "optimize.json").stat().st_mtime_ns
    optimize_model(src, out, precision="fp16", check_torch=False)
    assert (out / "optimize.json").stat().st_mtime_ns == stamp
    optimize_model(src, out, precision="fp16", check_torch=False, force=True)
    assert (out / "optimize.json").stat().st_mtime_ns != stamp


class _Perturb(GraphPass):
    name = "perturb"

    def run(self, model):
        w = max(model.graph.initializers.values(), key=lambda v: v.const_value.size)
        w.const_value = ir.tensor(w.const_value.numpy() * 1.5, name=w.name)
        return Result(model, changed=True, counts={"weights": 1})


def test_a_pass_past_budget_fails_the_stage_naming_it(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(PASSES, "perturb", _Perturb)  # negative control: a broken pass
    with pytest.raises(ParityError, match="pass 'perturb' drifted past the fp32 budget"):
        optimize_model(
            exported("llama"),
            tmp_path / "o",
            precision="fp32",
            passes=["remove-unused", "perturb"],
            check_torch=False,
        )
    assert not (tmp_path / "o").exists()  # nothing half-written
    out = optimize_model(
        exported("llama"),
        tmp_path / "o",
        precision="fp32",
        passes=["remove-unused", "perturb"],
        check_torch=False,
        allow_drift=True,
    )
    m = json.loads((out / "optimize.json").read_text())
    assert m["passes"][1]["within_budget"] is False and m["parity"]["allowed_drift"]


def test_bad_input_names_the_problem(tmp_path, exported, capsys):
    with pytest.raises(ArtifactError, match=r"has no export\.json"):
        optimize_model(tmp_path, tmp_path / "o")
    with pytest.raises(ConfigError, match="unknown pass"):
        optimize_model(exported("llama"), tmp_path / "o", passes=["fold-constant"])
    with pytest.raises(ConfigError, match="precision 'fp12' is not supported"):
        optimize_model(exported("llama"), tmp_path / "o", precision="fp12")
    assert main(["optimize", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "has no export.json" in capsys.readouterr().err


def test_list_passes_prints_the_default_order(capsys):
    assert main(["optimize", "x", "--precision", "int4", "--list-passes"]) == 0
    names = capsys.readouterr().out.split()
    assert names.index("attention") < names.index("fp16") < names.index("int4-weight-only")
    assert np.all([n in PASSES for n in names])
