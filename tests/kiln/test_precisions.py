"""The precision table: every record is consistent with the passes, the CLI and the tolerances."""

from __future__ import annotations

from dataclasses import replace

import pytest

from kiln.cli import build_parser
from kiln.errors import ConfigError
from kiln.parity import TOL
from kiln.precisions import (
    FP8,
    INT8,
    OPTIMIZE_TARGETS,
    PRECISIONS,
    Precision,
    names_for,
    precision_named,
)


def _choices(command: str, dest: str) -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return list(next(a for a in sub._actions if a.dest == dest).choices)


def table_problems(
    records: dict[str, Precision], passes: dict[str, object], cli: dict[str, list[str]]
) -> list[str]:
    """Everything in `records` that a stage could not act on, one line each."""
    out = []
    for name, p in records.items():
        if p.name != name:
            out.append(f"{name}: record is named {p.name!r}")
        floats = records.get(p.activations)
        if floats is None or floats.activations != floats.name:
            out.append(f"{name}: activations {p.activations!r} is not a float record")
        for pass_name in (p.cast, p.quantizer, p.ort_quantizer):
            if pass_name is not None and pass_name not in passes:
                out.append(f"{name}: pass {pass_name!r} is not registered")
        if p.ort_quantizer and not p.onnxruntime:
            out.append(f"{name}: an onnxruntime quantizer but not offered there")
        if bool(p.quantizer) != bool(p.quantized):
            out.append(f"{name}: a quantizer needs quantized kinds the engine reads back")
        others = [o.name for o in records.values() if o is not p and o.quantized & p.quantized]
        if others:
            out.append(f"{name}: quantized kinds shared with {others}")
    if cli["optimize"] != list(records):
        out.append(f"kiln optimize --precision {cli['optimize']} != the table")
    if cli["export"] != [n for n, p in records.items() if p.exported]:
        out.append(f"kiln export --precision {cli['export']} != the exported records")
    return out


@pytest.fixture(scope="module")
def passes() -> dict[str, object]:
    from kiln.optimize.passes import PASSES

    return dict(PASSES)


@pytest.fixture(scope="module")
def cli() -> dict[str, list[str]]:
    return {c: _choices(c, "precision") for c in ("optimize", "export")}


def test_every_record_is_consistent(passes, cli):
    assert table_problems(PRECISIONS, passes, cli) == []


@pytest.mark.parametrize(
    ("broken", "problem"),
    [
        ({**PRECISIONS, "int8": replace(INT8, quantizer="int8-weigth-only")}, "not registered"),
        ({**PRECISIONS, "int8": replace(INT8, activations="int4")}, "not a float record"),
        ({**PRECISIONS, "fp8": replace(FP8, quantized=INT8.quantized)}, "shared with"),
        ({k: v for k, v in PRECISIONS.items() if k != "bf16"}, "!= the table"),
    ],
)
def test_a_broken_record_is_caught(passes, cli, broken, problem):  # negative control
    assert any(problem in line for line in table_problems(broken, passes, cli))


def test_tolerances_come_from_the_records():
    assert list(TOL) == list(PRECISIONS)
    assert all(TOL[n] is p.tol for n, p in PRECISIONS.items())


def test_engine_profiles_take_the_labels_and_capabilities_of_the_table():
    from kiln.engine.profiles import available_profiles, load_profile

    for name in available_profiles():
        profile = load_profile(name)
        need = PRECISIONS[profile.precision].min_compute_capability
        assert all(float(cc) >= need for cc in profile.compute_capabilities), name


def test_each_stage_is_offered_what_it_can_make():
    assert names_for("export") == ("fp32", "fp16")
    assert names_for("onnxruntime") == ("fp32", "int8", "int4")
    assert names_for("tensorrt") == tuple(PRECISIONS)
    assert _choices("optimize", "target") == list(OPTIMIZE_TARGETS)
    assert PRECISIONS["int4"].made_by() == "`kiln optimize --precision int4`"
    assert PRECISIONS["fp32"].made_by() == "`kiln export --precision fp32`"
    assert PRECISIONS["fp8"].sm == "SM89" and PRECISIONS["fp16"].dtype == "float16"


def test_refusals_name_the_value_and_the_choices():
    assert precision_named("int4", target="onnxruntime") is PRECISIONS["int4"]
    with pytest.raises(ConfigError, match="precision 'fp12' is not supported; choose one of fp32"):
        precision_named("fp12")
    with pytest.raises(ConfigError, match=r"not offered for target 'onnxruntime'.*int8, int4, or"):
        precision_named("fp16", target="onnxruntime")
    with pytest.raises(
        ConfigError, match=r"not written by `kiln export`.*choose one of fp32, fp16"
    ):
        precision_named("bf16", target="export")
