"""Parity of an exported graph against the PyTorch model it came from, run through ONNX Runtime.

The reference is transformers' own forward with its own cache, not the export wrapper, so a
wrong cache contract in the wrapper shows up as drift. Each check point runs a prefill and then
continues from the graph's own `present` outputs, as a decode loop would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.export.wrapper import input_names
from kiln.models.families import ModelShape
from kiln.parity import TOL, Diff, ParityReport, compare, greedy_agreement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckPoint:
    """One trajectory: `batch` rows, new-token counts per step (first is the prefill), left padding.

    Rows r < len(left_pad) start with left_pad[r] padding tokens masked out, as a ragged batch does.
    """

    batch: int
    chunks: tuple[int, ...]
    left_pad: tuple[int, ...] = ()


# Prefill (past 0), single-token decode, a multi-token continuation over a past, batch 1 and >1,
# and a ragged left-padded batch. Ordered by total length so length-dependent RoPE grows as in
# a real generation.
DEFAULT_POINTS = (
    CheckPoint(batch=1, chunks=(7, 1, 1)),
    CheckPoint(batch=3, chunks=(5, 1, 1), left_pad=(0, 2, 4)),
    CheckPoint(batch=2, chunks=(9, 3, 1)),
)


def ort_session(path: Path) -> Any:
    """A CPU ONNX Runtime session over `path`."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    """Per-row position ids of the last `new` tokens: count of real tokens before each, HF style."""
    pos = np.cumsum(mask, axis=1) - 1
    pos = np.where(mask == 0, 1, pos)  # as transformers' generate() does for padding
    return pos[:, -new:].astype(np.int64)


def check_parity(
    onnx_path: Path,
    model: Any,
    shape: ModelShape,
    *,
    precision: str = "fp32",
    points: tuple[CheckPoint, ...] = DEFAULT_POINTS,
    seed: int = 0,
) -> tuple[ParityReport, list[dict[str, Any]]]:
    """Run every check point through ORT and PyTorch; return the report and per-step figures."""
    sess = ort_session(onnx_path)
    past_dtype = np.float16 if precision == "fp16" else np.float32
    rng = np.random.default_rng(seed)
    diffs: list[Diff] = []
    agree: list[float] = []
    steps: list[dict[str, Any]] = []
    for p in points:
        ids_all = rng.integers(0, shape.vocab, size=(p.batch, sum(p.chunks)), dtype=np.int64)
        pad = np.array([*p.left_pad, *[0] * (p.batch - len(p.left_pad))])
        full_mask = (np.arange(sum(p.chunks))[None, :] >= pad[:, None]).astype(np.int64)
        past = [np.zeros((p.batch, shape.kv_heads, 0, shape.head_dim), past_dtype)] * (
            2 * shape.layers
        )
        ref_cache = None
        done = 0
        for chunk in p.chunks:
            ids = ids_all[:, done : done + chunk]
            mask = full_mask[:, : done + chunk]
            pos = _positions(mask, chunk)
            feeds = dict(zip(input_names(shape.layers), [ids, mask, pos, *past], strict=True))
            logits, *present = sess.run(None, feeds)
            with torch.no_grad():
                ref = model(
                    input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(pos),
                    past_key_values=ref_cache,
                    use_cache=True,
                )
            ref_cache = ref.past_key_values
            tag = f"B{p.batch} S{chunk} P{done}"
            valid_q = mask[:, -chunk:].astype(bool)  # padded queries attend to nothing: skip them
            ref_logits = ref.logits.float().numpy()[valid_q]
            diffs.append(compare(f"logits[{tag}]", ref_logits, logits[valid_q], TOL[precision]))
            agree.append(greedy_agreement(ref_logits, logits.astype(np.float32)[valid_q]))
            valid_kv = mask.astype(bool)
            for i, layer in enumerate(ref_cache.layers):
                for kind, ref_kv, got in (
                    ("key", layer.keys, present[2 * i]),
                    ("value", layer.values, present[2 * i + 1]),
                ):
                    r = ref_kv.float().numpy()
                    # A sliding-window reference cache keeps only its window: compare that tail.
                    g, v = got[:, :, -r.shape[2] :], valid_kv[:, -r.shape[2] :]
                    r, g = r.transpose(0, 2, 1, 3)[v], g.transpose(0, 2, 1, 3)[v]
                    diffs.append(compare(f"present.{i}.{kind}[{tag}]", r, g, TOL[precision]))
            step_diffs = diffs[-(1 + 2 * shape.layers) :]
            steps.append(
                {
                    "batch": p.batch,
                    "seq": chunk,
                    "past": done,
                    "logits_max_abs": step_diffs[0].max_abs,
                    "kv_max_abs": max(d.max_abs for d in step_diffs[1:]),
                    "greedy_agreement": agree[-1],
                }
            )
            log.debug("parity %s: %s", tag, step_diffs[0].describe())
            past = present
            done += chunk
    report = ParityReport(precision, TOL[precision], diffs, float(np.mean(agree)))
    return report, steps
