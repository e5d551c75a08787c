"""Parity of an exported graph against the PyTorch model it came from, run through ONNX Runtime.

The reference is transformers' own forward with its own cache, not the export wrapper, so a
wrong cache contract in the wrapper shows up as drift. Each check point runs a prefill and then
continues from the graph's own `present` outputs, as a decode loop would.
"""

from __future__ import annotations

import copy
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


# Slot plans for the static layout: per step, per slot, (new tokens, restart the slot first).
# Ragged prefill, 20 decode steps, and slot 1 refilled with a new prompt mid-run while the
# others keep decoding: what continuous batching does.
STATIC_PLAN: tuple[tuple[tuple[int, bool], ...], ...] = (
    ((7, False), (4, False), (9, False)),
    *(((1, False), (5, True) if t == 10 else (1, False), (1, False)) for t in range(20)),
)
STATIC_MIN_CONTEXT = 32  # the plan's longest slot (9 + 20 tokens) must fit


def check_static_parity(
    onnx_path: Path,
    model: Any,
    shape: ModelShape,
    *,
    max_context: int,
    precision: str = "fp32",
    plan: tuple[tuple[tuple[int, bool], ...], ...] = STATIC_PLAN,
    seed: int = 0,
) -> tuple[ParityReport, list[dict[str, Any]]]:
    """Run a slot plan through the static graph and each slot alone through PyTorch; compare.

    Each slot's reference is transformers' forward at batch 1 with its own cache, so a write at
    the wrong position, a mask that leaks between slots, or a stale refill shows up as drift.
    """
    from kiln.export.static_kv import static_input_names

    sess = ort_session(onnx_path)
    dtype = np.float16 if precision == "fp16" else np.float32
    slots = len(plan[0])
    rng = np.random.default_rng(seed)
    buf = (slots, shape.kv_heads, max_context, shape.head_dim)
    buffers = [np.zeros(buf, dtype) for _ in range(2 * shape.layers)]
    length = [0] * slots
    ref_cache: list[Any] = [None] * slots
    # Dynamic-NTK RoPE in transformers remembers the longest sequence a module has seen; give
    # each slot's sequence a fresh module so the reference is "this sequence alone".
    stateful = any(getattr(m, "rope_type", None) == "dynamic" for m in model.modules())
    ref_model: list[Any] = [model] * slots
    diffs: list[Diff] = []
    agree: list[float] = []
    steps: list[dict[str, Any]] = []
    for n_step, step in enumerate(plan):
        s = max(n for n, _ in step)
        ids = np.zeros((slots, s), np.int64)  # right padding: masked until overwritten
        toks = []
        for r, (n, restart) in enumerate(step):
            if restart or n_step == 0:
                length[r], ref_cache[r] = 0, None
                ref_model[r] = copy.deepcopy(model) if stateful else model
            toks.append(rng.integers(0, shape.vocab, size=n, dtype=np.int64))
            ids[r, :n] = toks[r]
        index = np.array(length, np.int64)
        # Padding repeats the row's last real position: length-dependent RoPE reads the largest.
        real = np.array([n for n, _ in step])[:, None]
        pos = index[:, None] + np.minimum(np.arange(s)[None, :], real - 1)
        feeds = [ids, pos, index, *buffers]
        logits, *buffers = sess.run(
            None, dict(zip(static_input_names(shape.layers), feeds, strict=True))
        )
        first = len(diffs)
        for r, (n, _) in enumerate(step):
            with torch.no_grad():
                ref = ref_model[r](
                    input_ids=torch.from_numpy(toks[r][None]),
                    position_ids=torch.from_numpy(pos[r : r + 1, :n]),
                    past_key_values=ref_cache[r],
                    use_cache=True,
                )
            ref_cache[r] = ref.past_key_values
            tag = f"step {n_step} slot {r} S{n} at {length[r]}"
            ref_logits = ref.logits[0].float().numpy()
            diffs.append(compare(f"logits[{tag}]", ref_logits, logits[r, :n], TOL[precision]))
            agree.append(greedy_agreement(ref_logits, logits[r, :n].astype(np.float32)))
            end = length[r] + n
            for i, layer in enumerate(ref_cache[r].layers):
                for kind, ref_kv, got in (
                    ("key", layer.keys, buffers[2 * i]),
                    ("value", layer.values, buffers[2 * i + 1]),
                ):
                    want = ref_kv[0].float().numpy()  # a sliding window keeps only its tail
                    have = got[r, :, end - want.shape[1] : end]
                    diffs.append(compare(f"present.{i}.{kind}[{tag}]", want, have, TOL[precision]))
            length[r] = end
        step_diffs = diffs[first:]
        steps.append(
            {
                "step": n_step,
                "tokens": [n for n, _ in step],
                "write_index": index.tolist(),
                "logits_max_abs": max(d.max_abs for d in step_diffs if d.name.startswith("logits")),
                "kv_max_abs": max(d.max_abs for d in step_diffs if d.name.startswith("present")),
            }
        )
    return ParityReport(precision, TOL[precision], diffs, float(np.mean(agree))), steps
