"""Calibrated int4 (GPTQ), mixed precision and 2:4 sparsity: math on hand-made weights, passes on
a tiny exported Llama through ONNX Runtime, and a negative control for each."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from kiln.errors import ConfigError
from kiln.optimize.calibrate import Calibration, log_probs, mean_kl
from kiln.optimize.calibrated import (
    CalibratedInt4Pass,
    CalibratedMatMulNBitsPass,
    CalibratedPass,
    to_matmul_nbits,
)
from kiln.optimize.gptq import dequantize, gptq_int4
from kiln.optimize.mixed import (
    Group,
    MixedMatMulNBitsPass,
    MixedPrecisionPass,
    groups_of,
    mixed_precision,
    plan,
)
from kiln.optimize.precision.weight_only import quantize_block, quantize_weights
from kiln.optimize.sparsity import CalibratedSparse24Pass, is_2of4, mask_2of4, sparsify_2of4


def _inputs(rng: np.random.Generator, k: int, loud: float = 30.0) -> np.ndarray:
    """Correlated activations with a few loud channels, as LLM MatMul inputs have."""
    x = rng.standard_normal((512, k)) @ rng.standard_normal((k, k)) / np.sqrt(k)
    x[:, :4] *= loud
    return x


def _err(x: np.ndarray, w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.linalg.norm(x @ (w - w_hat)) / np.linalg.norm(x @ w))


def test_gptq_beats_round_to_nearest_and_wrong_calibration_does_not():
    rng = np.random.default_rng(0)
    k, n = 128, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    x = _inputs(rng, k)
    q, s = quantize_block(w, 4, 32)
    rtn = _err(x, w, dequantize(q, s, 32))
    q, s = gptq_int4(w, x.T @ x)
    assert q.min() >= -8 and q.max() <= 7 and s.shape == (4, n)
    good = _err(x, w, dequantize(q, s, 32))
    # Negative control: the Hessian of other inputs (loud channels elsewhere, 1000x the scale).
    wrong = _inputs(np.random.default_rng(1), k)[:, ::-1] * 1000
    q, s = gptq_int4(w, wrong.T @ wrong)
    bad = _err(x, w, dequantize(q, s, 32))
    assert good < 0.7 * rtn, (good, rtn)
    assert bad > 1.2 * good, (bad, good)


def _calibration(vocab: int, seqs: int = 4, length: int = 24, seed: int = 0) -> Calibration:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (seqs, length))
    return Calibration(tuple(tuple(int(t) for t in s) for s in ids), "random ids")


@pytest.fixture(scope="module")
def tiny(exported):
    path = exported("llama")
    return path, _calibration(300), _calibration(300, seed=7)


def test_gptq_pass_outputs_int4_blocks_and_beats_rtn_kl(tiny):
    path, calib, gate = tiny
    ref = log_probs(ir.load(path / "model.onnx"), gate)
    rtn = ir.load(path / "model.onnx")
    quantize_weights(rtn, bits=4, block=32)
    model = ir.load(path / "model.onnx")
    result = CalibratedInt4Pass(calib).run(model)
    assert (
        result.counts["weights"] == 15 and result.counts["groups"] == 3
    )  # 9 distinct inputs, 4 a group
    dq = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dq) == 15
    assert {n.inputs[0].const_value.dtype for n in dq} == {ir.DataType.INT4}
    assert all(len(n.inputs) == 2 for n in dq)  # symmetric: no zero point (TensorRT)
    assert "peak memory per group" in result.notes[-1]
    kl_gptq, kl_rtn = mean_kl(ref, log_probs(model, gate)), mean_kl(ref, log_probs(rtn, gate))
    assert kl_gptq < kl_rtn, (kl_gptq, kl_rtn)


def test_matmul_nbits_repack_computes_the_same_as_dequantize(tiny):
    path, _, gate = tiny
    dq = ir.load(path / "model.onnx")
    quantize_weights(dq, bits=4, block=32)
    nbits = ir.load(path / "model.onnx")
    quantize_weights(nbits, bits=4, block=32)
    assert to_matmul_nbits(nbits, accuracy_level=0) == 15
    assert not [n for n in nbits.graph if n.op_type == "DequantizeLinear"]
    a, b = log_probs(dq, gate), log_probs(nbits, gate)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True)) < 1e-3
    # Negative control: swapping nibbles breaks the equivalence the check relies on.
    for node in nbits.graph:
        if node.op_type == "MatMulNBits":
            v = node.inputs[1]
            u = v.const_value.numpy()
            v.const_value = ir.tensor(((u >> 4) | (u << 4)).astype(np.uint8), name=v.name)
            break
    c = log_probs(nbits, gate)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, c, strict=True)) > 1e-2


def test_calibrated_passes_refuse_without_calibration(tiny):
    """Every CalibratedPass reads calibration from the pass config and refuses without it."""
    path, _, _ = tiny
    model = ir.load(path / "model.onnx")
    calibrated = (
        CalibratedInt4Pass,
        CalibratedMatMulNBitsPass,
        CalibratedSparse24Pass,
        MixedPrecisionPass,
        MixedMatMulNBitsPass,
    )
    config = Calibration(((1, 2, 3),), "test").as_config()
    for cls in calibrated:
        assert issubclass(cls, CalibratedPass)
        with pytest.raises(ConfigError, match="--calibration FILE"):
            cls.for_model({}).requires(model)
        step = cls.for_model({**config, "weight_budget_mib": 1.0})
        step.requires(model)  # the control: with calibration (and a budget) it is accepted
        assert isinstance(step, CalibratedPass) and step.calibration is not None
    with pytest.raises(ConfigError, match="--weight-budget-mib"):
        MixedPrecisionPass.for_model(config).requires(model)


def test_two_of_four_masks():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8))
    keep = mask_2of4(np.abs(w))
    assert (keep.reshape(4, 4, 8).sum(1) == 2).all()
    pruned = np.where(keep, w, 0)
    assert is_2of4(pruned) and not is_2of4(w)  # negative control: dense is not 2:4
    kept_min = np.abs(np.where(keep, w, np.inf)).reshape(4, 4, 8).min(1)
    dropped_max = np.abs(np.where(keep, 0, w)).reshape(4, 4, 8).max(1)
    assert (kept_min >= dropped_max).all()


def test_sparsity_pass_on_tiny_model_keeps_head_dense(tiny):
    path, calib, gate = tiny
    ref = log_probs(ir.load(path / "model.onnx"), gate)
    kl = {}
    for name, cal in (("magnitude", None), ("calibrated", calib)):
        model = ir.load(path / "model.onnx")
        counts = sparsify_2of4(model, cal)
        assert counts["weights"] == 14 and counts["zeros"] * 2 >= counts["params"]
        ws = {m.name: m.const_value.numpy() for m in model.graph.initializers.values()
              if m.const_value is not None and len(m.const_value.shape) == 2}  # fmt: skip
        sparse = [n for n, w in ws.items() if is_2of4(w)]
        assert len(sparse) >= 14
        kl[name] = mean_kl(ref, log_probs(model, gate))
    assert 0 < kl["calibrated"] < 1.0 and 0 < kl["magnitude"] < 1.0


def test_wanda_score_keeps_the_weights_of_loud_channels():
    rng = np.random.default_rng(0)
    k, n = 64, 16
    w = rng.standard_normal((k, n))
    w[::4] *= 0.1  # small weights on one loud channel per group of 4: magnitude drops them
    x = rng.standard_normal((512, k))
    x[:, ::4] *= 100.0
    norms = np.sqrt((x**2).sum(0))
    mag = np.where(mask_2of4(np.abs(w)), w, 0)
    wanda = np.where(mask_2of4(np.abs(w) * norms[:, None]), w, 0)
    assert _err(x, w, wanda) < 0.5 * _err(x, w, mag)
    # the control: calibration on the wrong scale (inverse norms) keeps the quiet channels
    wrong = np.where(mask_2of4(np.abs(w) / norms[:, None]), w, 0)
    assert _err(x, w, wrong) > _err(x, w, mag)


def _group(name: str, kl4: float, kl8: float, size: int) -> Group:
    return Group(name, [name], [(size, 1)], {"int4": size // 2, "int8": size, "float": 4 * size},
                 {"int4": kl4, "int8": kl8, "float": 0.0})  # fmt: skip


def test_plan_spends_the_budget_where_kl_per_byte_is_highest():
    groups = [
        _group("a", 1.0, 0.1, 100),
        _group("b", 0.01, 0.001, 100),
        _group("c", 0.5, 0.0, 1000),
    ]
    # int4 sizes 50 + 50 + 500 = 600; upgrades to int8 gain 0.018/B (a), 0.00018/B (b), 0.001/B (c)
    assert plan(groups, fixed=0, budget_bytes=650) == 650
    assert [g.level for g in groups] == ["int8", "int4", "int4"]
    assert plan(groups, fixed=0, budget_bytes=1150) == 1150  # c before b and before a -> float
    assert [g.level for g in groups] == ["int8", "int4", "int8"]
    assert plan(groups, fixed=0, budget_bytes=10_000) <= 10_000
    assert [g.level for g in groups] == ["float", "float", "int8"]  # c's int8 costs no KL
    with pytest.raises(ConfigError, match="below the all-int4 size"):  # negative control
        plan(groups, fixed=0, budget_bytes=100)


def test_mixed_plan_between_int4_and_int8_beats_uniform_int4(tiny):
    path, calib, gate = tiny
    base = ir.load(path / "model.onnx")
    groups, fixed = groups_of(base)
    lo = fixed + sum(g.bytes["int4"] for g in groups)
    hi = fixed + sum(g.bytes["int8"] for g in groups)
    budget = (lo + hi) / 2 / 2**20
    ref = log_probs(base, gate)
    model = ir.load(path / "model.onnx")
    counts, table = mixed_precision(model, calib, budget)
    assert counts["planned_weight_bytes"] <= budget * 2**20
    assert counts["groups_int8"] + counts["groups_float"] > 0 and counts["groups_int4"] > 0
    assert len(table) == counts["groups"] and all("kl" in r for r in table)
    uniform = ir.load(path / "model.onnx")
    quantize_weights(uniform, bits=4, block=32)
    assert mean_kl(ref, log_probs(model, gate)) < mean_kl(ref, log_probs(uniform, gate))


def test_compress_artifact_gate_refuses_and_removes(exported, tmp_path):
    from kiln.optimize.methods import compress_artifact

    path = exported("llama")
    text = tmp_path / "calib.txt"
    text.write_text("x")
    out = tmp_path / "c"
    with pytest.raises(ConfigError, match="weight-budget-mib"):
        compress_artifact(path, out, method="mixed", calibration=text)
    with pytest.raises(ConfigError, match="needs --calibration"):
        compress_artifact(path, out, method="gptq-int4", calibration=None)
    assert not out.exists()  # the KL gate itself: tests/compress/test_prune.py
