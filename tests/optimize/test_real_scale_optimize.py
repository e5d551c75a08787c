"""The SmolLM-135M-shaped export optimizes at fp32 for both targets with no --allow-drift.

The model is REAL_SCALE_CONFIGS["smollm-135m"] (tests/tiny_models.py): 30 layers at
initializer_range 0.1. Each pass's drift is judged graph against graph (TOL["fp32"].atol) and
the result against PyTorch by the float64 noise-floor check (export/check.py).
"""

from __future__ import annotations

import json
import os

import pytest

from kiln.optimize import optimize_model

# Not yet in `make test`: under load the set took well over an hour on 2 cores, and it has not
# been timed on a quiet machine. `make test-real-scale` runs it (KILN_REAL_SCALE=1).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("KILN_REAL_SCALE"),
        reason="real-scale models: run with KILN_REAL_SCALE=1 (make test-real-scale)",
    ),
]

CASES = [(kv, target) for kv in ("concat", "static") for target in ("onnxruntime", "tensorrt")]


@pytest.mark.parametrize(("kv", "target"), CASES, ids=[f"{kv}-{t}" for kv, t in CASES])
def test_real_scale_fp32_optimizes_without_allow_drift(exported, tmp_path, kv, target):
    out = optimize_model(
        exported("smollm-135m", "fp32", kv), tmp_path / "opt", target=target, precision="fp32"
    )
    manifest = json.loads((out / "optimize.json").read_text())
    parity = manifest["parity"]
    assert parity["ok"] and parity["greedy_64"] == 1.0, parity
    torch = parity["torch"]
    assert torch["reference"] == "PyTorch float64" and torch["ok"], torch
    assert torch["torch_fp32_logits_max_abs"] > 1e-5  # real scale: PyTorch fp32 is off too
    assert torch["worst_budget_ratio"] <= 1.0
    assert all(p["within_budget"] for p in manifest["passes"])
