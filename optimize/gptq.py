"""Error-compensating int4 rounding (GPTQ) with a clipping search, for one weight W[K, N].

The layer's output error for inputs X is ||X (W - Ŵ)||², i.e. tr(ΔWᵀ H ΔW) with H = XᵀX
(optimize/calibrate.py collects H through ONNX Runtime). GPTQ (Frantar et al. 2022) rounds the
rows of W (input channels) in order and moves each row's rounding error onto the rows not yet
rounded, through the upper Cholesky factor U of H⁻¹: the exact least-squares update.

Each block of `block` rows along K gets one symmetric scale (the grid of
optimize/precision/weight_only.py: q in [-8, 7], scale = clip * max|w| / 7, no zero point, which
TensorRT's DequantizeLinear and MatMulNBits both take), chosen when the block is reached: the
clipping ratio (AWQ's clip search) that minimizes the block's rounding error weighted by
diag(H), i.e. by each input channel's mean activation energy.

ONNX Runtime 1.32 ships a GPTQ (onnxruntime.quantization.neural_compressor.weight_only.gptq),
but it propagates the error through Hinv[i:, i] of the *upper* factor, which is zero below the
diagonal, so its result is round-to-nearest with an MSE scale search; and it re-quantizes its
own output with a different symmetric grid. Hence this module (numpy only).
"""

from __future__ import annotations

import numpy as np

QMIN, QMAX = -8, 7
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def block_scales(
    w_bn: np.ndarray, energy_b: np.ndarray, clip: tuple[float, ...] = CLIP_GRID
) -> np.ndarray:
    """Per-column scale [N] for one block of rows w_bn[b, N] with input energies energy_b[b].

    Tries each clipping ratio and keeps, per output column, the one with the least
    Σ_k energy_k (w - ŵ)²: clipping large weights helps when their inputs are quiet.
    """
    amax = np.abs(w_bn).max(axis=0)
    amax = np.where(amax == 0, 1.0, amax)
    best_err = np.full(w_bn.shape[1], np.inf)
    best = amax / QMAX
    for ratio in clip:
        s = ratio * amax / QMAX
        err = (energy_b[:, None] * (w_bn - np.clip(np.rint(w_bn / s), QMIN, QMAX) * s) ** 2).sum(0)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best = np.where(better, s, best)
    return best


def gptq_int4(
    w_kn: np.ndarray,
    h_kk: np.ndarray | None,
    *,
    block: int = 32,
    damp: float = 0.01,
    clip: tuple[float, ...] = CLIP_GRID,
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 blocks of W[K, N] along K: (q[K, N] int8 in [-8, 7], scale[K/block, N]).

    `h_kk` is XᵀX of the layer's calibration inputs; None means no calibration (identity H:
    round-to-nearest with the clipping search only). `damp` adds that fraction of mean(diag H)
    to the diagonal so H is invertible when some channels never fire.
    """
    k, n = w_kn.shape
    if k % block:
        raise ValueError(f"K={k} is not a multiple of the block {block}")
    w = w_kn.astype(np.float64).copy()
    h = np.eye(k) if h_kk is None else h_kk.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead, :] = 0.0
    energy = np.diag(h).copy()
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H⁻¹ = Uᵀ U
    q = np.zeros((k, n), np.int8)
    scales = np.zeros((k // block, n), np.float64)
    for i1 in range(0, k, block):
        i2 = i1 + block
        s = block_scales(w[i1:i2], energy[i1:i2], clip)
        scales[i1 // block] = s
        err = np.zeros((block, n))
        for j in range(block):
            i = i1 + j
            qi = np.clip(np.rint(w[i] / s), QMIN, QMAX)
            q[i] = qi
            e = (w[i] - qi * s) / u[i, i]
            w[i + 1 : i2] -= np.outer(u[i, i + 1 : i2], e)
            err[j] = e
        w[i2:] -= u[i1:i2, i2:].T @ err
    return q, scales.astype(np.float32)


def dequantize(q_kn: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    """W ≈ q * scale, the DequantizeLinear(axis=0, block_size) the graph computes, float32."""
    k, n = q_kn.shape
    out: np.ndarray = q_kn.reshape(k // block, block, n).astype(np.float32) * scale[:, None, :]
    return out.reshape(k, n)
