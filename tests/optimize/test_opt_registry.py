"""The pass registry: one class per name, default lists built from it, model facts passed alike."""

from __future__ import annotations

import sys
import textwrap

import pytest

from kiln.optimize import default_passes
from kiln.optimize.base import GraphPass, passes_in
from kiln.optimize.passes import PASSES, build_passes
from kiln.precisions import PRECISIONS, names_for


def test_every_pass_is_registered_under_its_class_name():
    assert all(cls.name == name and issubclass(cls, GraphPass) for name, cls in PASSES.items())
    assert len(PASSES) == 32  # 26 + calibrated int4, 2:4 sparsity, mixed (two targets each)


@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
def test_every_default_list_names_registered_passes(target):
    for precision in names_for(target):
        names = default_passes(precision, target=target)
        assert names and all(n in PASSES for n in names), (precision, names)


def test_a_pass_file_registers_by_existing(tmp_path, monkeypatch):
    pkg = tmp_path / "extra_passes"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "shout.py").write_text(
        textwrap.dedent(
            """
            from kiln.optimize.base import GraphPass

            class ShoutBase(GraphPass):  # no name of its own: a base, not a pass
                pass

            class ShoutPass(ShoutBase):
                name = "shout"
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    found = passes_in("extra_passes")
    assert [c.name for c in found] == ["shout"]  # negative control: ShoutBase is left out
    sys.modules.pop("extra_passes.shout", None)
    sys.modules.pop("extra_passes", None)


def test_model_facts_reach_the_passes_that_need_them():
    config = {"max_positions": 128, "sliding_window": 64}
    rotary, gqa, fold = build_passes(
        ["ort-rotary", "ort-gqa", "fold-constants"],
        precision="fp32",
        source_precision="fp32",
        config=config,
    )
    assert rotary.max_positions == 128 and gqa.sliding_window == 64
    assert type(fold) is PASSES["fold-constants"]
    (rotary,) = build_passes(["ort-rotary"], precision="fp32", source_precision="fp32")
    assert rotary.max_positions == 4096  # no config: the default cache length


@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_tolerance_switches_at_the_precision_passes(precision):
    names = default_passes(precision)
    steps = build_passes(names, precision=precision, source_precision="fp32")
    record = PRECISIONS[precision]
    first = names.index(record.cast) if record.cast else len(names)
    assert {s.tolerance for s in steps[:first]} == {"fp32"}
    if record.quantizer:
        q = names.index(record.quantizer)
        assert {s.tolerance for s in steps[first:q]} == {record.activations}
        assert {s.tolerance for s in steps[q:]} == {precision}
    else:
        assert {s.tolerance for s in steps[first:]} <= {precision}
