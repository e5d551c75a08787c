"""Models of published size export at fp32 with no --allow-drift, and the check still bites.

REAL_SCALE_CONFIGS (tests/tiny_models.py): a 30-layer SmolLM-135M-shaped Llama and a
Qwen2.5-0.5B-shaped Qwen2, seeded random weights at initializer_range 0.1 (max |logit| 12 and
16), saved with save_pretrained and exported through the real loading path. At this depth
PyTorch fp32 itself is ~1e-4 off float64 on the logits, so a fixed absolute tolerance of 1e-4
would fail every such export: the fp32 check judges the graph against PyTorch's own rounding.
"""

from __future__ import annotations

import json
import os

import onnx
import pytest
from tiny_models import perturb_norm_gain

from kiln.errors import ParityError
from kiln.export.check import check_parity
from kiln.export.source import describe_source, load_model
from kiln.parity import TOL

# Not yet in `make test`: under load the set took well over an hour on 2 cores, and it has not
# been timed on a quiet machine. `make test-real-scale` runs it (KILN_REAL_SCALE=1).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("KILN_REAL_SCALE"),
        reason="real-scale models: run with KILN_REAL_SCALE=1 (make test-real-scale)",
    ),
]

# The Qwen-shaped export is the slowest test of the suite (150M-entry tied embedding);
# it runs in the concat layout only, the SmolLM shape in both.
EXPORTS = [("smollm-135m", "concat"), ("smollm-135m", "static"), ("qwen2.5-0.5b", "concat")]


@pytest.mark.parametrize(("name", "kv"), EXPORTS, ids=[f"{n}-{kv}" for n, kv in EXPORTS])
def test_real_scale_export_passes_without_allow_drift(exported, name, kv):
    parity = json.loads((exported(name, "fp32", kv) / "export.json").read_text())["parity"]
    assert parity["ok"] and not parity["allowed_drift"], parity
    assert parity["reference"] == "PyTorch float64"
    # Real scale: PyTorch fp32's own logit error is far above the tiny models' ~2e-7 ...
    assert parity["torch_fp32_logits_max_abs"] > 1e-5
    # ... and the graph stays within the stated factor of it on every output.
    assert (
        parity["logits_max_abs"] <= TOL["fp32"].noise * parity["torch_fp32_logits_max_abs"] + 1e-6
    )
    assert parity["worst_budget_ratio"] <= 1.0
    assert parity["greedy_agreement"] == 1.0


def _check(path, tiny_model_dir, name):
    src = describe_source(tiny_model_dir(name))
    model = load_model(src.path)
    report, _ = check_parity(path, model, src.family.shape(model.config))
    return report


def test_real_scale_perturbed_norm_gain_fails(exported, tiny_model_dir, tmp_path):
    """Negative control: one RMSNorm gain of one layer 1% off fails the 30-layer model's check."""
    proto = onnx.load(str(exported("smollm-135m") / "model.onnx"))
    perturb_norm_gain(proto, 2 * 15 + 1, index=7)  # layer 15's post-attention norm
    onnx.save(proto, str(tmp_path / "perturbed.onnx"), save_as_external_data=True)
    report = _check(tmp_path / "perturbed.onnx", tiny_model_dir, "smollm-135m")
    assert not report.ok
    with pytest.raises(ParityError, match=r"drifted past the fp32 tolerance.*\n  worst: .*f64"):
        report.raise_if_failed("perturbed graph")


def test_real_scale_skipped_kv_write_fails(exported, tiny_model_dir, tmp_path):
    """Negative control: the static graph with one layer's K write dropped fails the check."""
    proto = onnx.load(str(exported("smollm-135m", kv="static") / "model.onnx"))
    node = [n for n in proto.graph.node if n.op_type == "TensorScatter"][40]  # layer 20's keys
    node.op_type = "Identity"
    del node.input[1:]
    del node.attribute[:]
    onnx.save(proto, str(tmp_path / "unwritten.onnx"), save_as_external_data=True)
    assert not _check(tmp_path / "unwritten.onnx", tiny_model_dir, "smollm-135m").ok
