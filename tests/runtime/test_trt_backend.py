"""TensorRT backend end to end (bench/gpu_check.py); needs an NVIDIA GPU and a CUDA driver."""

from __future__ import annotations

import pytest

from kiln.runtime.cuda_mem import gpu_compute_capability

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        gpu_compute_capability() is None,
        reason="no NVIDIA GPU/driver visible: TensorRT engines cannot be deserialized here",
    ),
]


def test_engine_end_to_end(tmp_path):
    from bench.gpu_check import run_checks

    results = run_checks(tmp_path)
    failed = [(n, d) for n, ok, d in results if not ok]
    assert not failed, failed
    assert any(n == "zen text through the engine" for n, _, _ in results)
