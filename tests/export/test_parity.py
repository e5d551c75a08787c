"""Exported graphs match PyTorch at prefill and decode shapes, for every supported family."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from tiny_models import TINY_CONFIGS, perturb_norm_gain

from kiln.errors import ParityError
from kiln.export.check import CheckPoint, Trajectories, check_parity
from kiln.export.source import describe_source, load_model
from kiln.graph_io import ort_session
from kiln.layouts import CONCAT
from kiln.parity import TOL, ParityReport, compare_to_float64

# Shapes the export's own check does not use: batch 4 ragged, a run of single-token decodes,
# and a 5-token chunk over a past.
OTHER_POINTS = (
    CheckPoint(batch=4, chunks=(3, 1, 2, 1), left_pad=(0, 1, 2, 0)),
    CheckPoint(batch=1, chunks=(2, 1, 1, 1, 1, 5, 1)),
)


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_export_matches_pytorch(name, exported, tiny_model_dir):
    artifact = exported(name)
    manifest = json.loads((artifact / "export.json").read_text())
    parity = manifest["parity"]
    assert parity["ok"] and not parity["allowed_drift"]
    assert parity["logits_max_abs"] <= TOL["fp32"].atol
    assert parity["reference"] == "PyTorch float64"
    assert parity["worst_budget_ratio"] <= 1.0
    assert 0 < parity["torch_fp32_logits_max_abs"] < 1e-5  # tiny scale: a few float32 ulps
    assert parity["greedy_agreement"] == 1.0
    assert {(s["past"] == 0, s["seq"] == 1) for s in parity["steps"]} >= {
        (True, False),
        (False, True),
    }

    src = describe_source(tiny_model_dir(name))
    model = load_model(src.path)
    report, steps = check_parity(
        artifact / "model.onnx",
        model,
        src.family.shape(model.config),
        plan=Trajectories(OTHER_POINTS),
        seed=1,
    )
    assert report.ok, report.worst().describe()
    assert max(s["logits_max_abs"] for s in steps) <= 1e-4


def test_fp16_export_within_fp16_tolerance(exported):
    manifest = json.loads((exported("llama", "fp16") / "export.json").read_text())
    assert manifest["parity"]["ok"]
    assert manifest["parity"]["tolerance"]["atol"] == TOL["fp16"].atol
    assert manifest["io"]["inputs"][3]["dtype"] == "float16"
    assert manifest["io"]["outputs"][0]["dtype"] == "float16"


def _prefill(sess, layers, ids, past=None, past_len=0, kv=(2, 16)):
    b = ids.shape[0]
    if past is None:
        past = [np.zeros((b, kv[0], 0, kv[1]), np.float32)] * (2 * layers)
    total = past_len + ids.shape[1]
    feeds = [ids, np.ones((b, total), np.int64), np.arange(past_len, total)[None].repeat(b, 0)]
    return sess.run(None, dict(zip(CONCAT.input_names(layers), [*feeds, *past], strict=True)))


def test_kv_cache_consistency(exported):
    """Prefill N then decode 1 gives the last logits of a prefill of N+1."""
    sess = ort_session(exported("llama") / "model.onnx")
    ids = np.random.default_rng(3).integers(0, 300, size=(2, 9), dtype=np.int64)
    full_logits, *_ = _prefill(sess, 2, ids)
    _, *present = _prefill(sess, 2, ids[:, :8])
    step_logits, *_ = _prefill(sess, 2, ids[:, 8:], past=present, past_len=8)
    np.testing.assert_allclose(step_logits[:, -1], full_logits[:, -1], atol=1e-5)

    # Negative control: a decode step that lost one layer's cached keys no longer agrees.
    broken = list(present)
    broken[2] = np.zeros_like(broken[2])
    bad_logits, *_ = _prefill(sess, 2, ids[:, 8:], past=broken, past_len=8)
    assert np.abs(bad_logits[:, -1] - full_logits[:, -1]).max() > 1e-3


def test_parity_check_catches_a_perturbed_weight(exported, tiny_model_dir, tmp_path):
    """Negative control: the check that passed fails after one weight changes slightly."""
    proto = onnx.load(str(exported("llama") / "model.onnx"))
    name = "model.model.layers.0.input_layernorm.weight"
    init = next(t for t in proto.graph.initializer if t.name == name)
    w = onnx.numpy_helper.to_array(init).copy()
    w[0] += 0.05  # one RMSNorm gain in the first layer, 5% off
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(proto, str(tmp_path / "perturbed.onnx"))

    src = describe_source(tiny_model_dir("llama"))
    model = load_model(src.path)
    report, _ = check_parity(tmp_path / "perturbed.onnx", model, src.family.shape(model.config))
    assert not report.ok
    with pytest.raises(ParityError, match=r"drifted past the fp32 tolerance.*\n  worst: "):
        report.raise_if_failed("perturbed graph")


@pytest.mark.parametrize("consumer", [0, 3])
def test_parity_check_catches_a_1pct_norm_gain(exported, tiny_model_dir, tmp_path, consumer):
    """Negative control, tiny scale: one element of one RMSNorm gain * 1.01 (layer 0 or 1)."""
    proto = onnx.load(str(exported("llama") / "model.onnx"))
    perturb_norm_gain(proto, consumer)
    onnx.save(proto, str(tmp_path / "perturbed.onnx"))

    src = describe_source(tiny_model_dir("llama"))
    model = load_model(src.path)
    report, _ = check_parity(tmp_path / "perturbed.onnx", model, src.family.shape(model.config))
    summary = report.summary()
    assert not report.ok and summary["reference"] == "PyTorch float64"
    assert summary["worst_budget_ratio"] > 10  # far past the budget, not at its edge
    with pytest.raises(
        ParityError, match=r"(?s)8x PyTorch fp32's error against float64.*would have passed"
    ):
        report.raise_if_failed("perturbed graph")


def test_longrope_needs_the_in_graph_switch(tiny_model_dir, tmp_path, monkeypatch):
    """Negative control: without the export patch a static slot gets another slot's RoPE factors.

    transformers' own longrope update traces (a torch.where on the batch-wide length), so a
    concat graph exported without export/patches.py matches PyTorch on the concat plan, whose
    reference runs the same batch. In static slots each sequence runs alone: at the first step
    slot 2 is 9 tokens long (past original_max_position_embeddings 8), so the unpatched graph
    gives slots 0 and 1 (7 and 4 tokens) the long factors too, which PyTorch alone does not.
    """
    import importlib
    from contextlib import nullcontext

    from kiln.export import export_model

    tracing = importlib.import_module("kiln.export.onnx_from_hf")  # the module, not the function
    monkeypatch.setattr(tracing, "sequence_dependent_rope_in_graph", lambda m: nullcontext(0))
    with pytest.raises(
        ParityError, match=r"drifted past the fp32 tolerance.*\n  worst: .*slot \d+ S\d+ at"
    ):
        export_model(tiny_model_dir("phi3-longrope"), tmp_path / "out", kv="static", max_context=64)


def test_a_reference_off_float64_does_not_widen_the_budget():
    """Negative control of the rule: PyTorch fp32 off float64 by more than rounding explains.

    That is how a module changed by tracing looked (longrope traced without its patch: 0.012 off
    on max |logit| 0.55); counted in full, 8x its error would pass a graph 0.005 off everywhere.
    """
    tol = TOL["fp32"]
    f64 = np.random.default_rng(0).normal(0.0, 0.2, size=(4, 300))
    suspect = f64 + 0.012
    report = ParityReport(
        "fp32", tol, [compare_to_float64("logits", f64, suspect, f64 + 5e-3, tol)], 1.0
    )
    diff = report.diffs[0]
    assert diff.noise_capped and not report.ok
    assert diff.allowed == pytest.approx(tol.noise * tol.noise_cap * np.abs(f64).max() + tol.floor)
    with pytest.raises(ParityError, match=r"(?s)reference is suspect.*capped from 0\.012"):
        report.raise_if_failed("graph")
    # The same graph error with an fp32 reference that rounds as fp32 does is judged as before.
    honest = f64 + np.float32(1e-7)
    assert not compare_to_float64("logits", f64, honest, f64 + 5e-3, tol).ok
    assert compare_to_float64("logits", f64, honest, f64 + 5e-7, tol).ok
