"""Parity of an exported graph against the PyTorch model it came from, run through ONNX Runtime.

The reference is transformers' own forward with its own cache, not the export wrapper, so a
wrong cache contract in the wrapper shows up as drift. A layout's parity plan (export/layouts.py)
says which graph calls to make and which PyTorch forwards each is compared with; one driver,
`check_parity`, runs any plan through the layout's stepper (kiln/graph_io.py), continuing from
the graph's own cache as a decode loop would.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kiln.graph_io import positions, stepper
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


# Slot schedule for the static layout: per step, per slot, (new tokens, restart the slot first).
# Ragged prefill, 20 decode steps, and slot 1 refilled with a new prompt mid-run while the
# others keep decoding: what continuous batching does. Its longest slot (9 + 20 tokens) is why
# kiln/layouts.py STATIC.min_context is 32.
STATIC_PLAN: tuple[tuple[tuple[int, bool], ...], ...] = (
    ((7, False), (4, False), (9, False)),
    *(((1, False), (5, True) if t == 10 else (1, False), (1, False)) for t in range(20)),
)


@dataclass(frozen=True)
class RefCall:
    """One PyTorch forward a graph call is compared with: graph `rows`, one reference sequence.

    `valid_q [b, s]` marks the compared queries (padding attends to nothing: skipped);
    `valid_kv [b, end]` the compared cache positions, `end` being where the sequence ends in the
    graph's cache (a sliding-window reference keeps only its tail: that tail is compared).
    """

    sequence: int  # a number not seen before starts a fresh reference cache
    rows: slice
    inputs: dict[str, np.ndarray]  # transformers forward kwargs
    valid_q: np.ndarray
    valid_kv: np.ndarray
    tag: str


@dataclass(frozen=True)
class PlannedCall:
    """One graph call: its leading inputs by name, references, and its manifest figures."""

    inputs: dict[str, np.ndarray]
    refs: tuple[RefCall, ...]
    record: dict[str, Any]
    reset: int | None = None  # start this many fresh rows before the call


class ParityPlan(Protocol):
    """The graph calls of one layout's check, with the PyTorch forwards each is compared with."""

    def describe(self) -> str:
        """What the plan runs, for the log."""
        ...

    def calls(self, shape: ModelShape, rng: np.random.Generator) -> Iterator[PlannedCall]:
        """The calls in order; token ids drawn from `rng`."""
        ...


@dataclass(frozen=True)
class Trajectories:
    """Concat layout: each point is a batch decoded from an empty cache, one reference for all."""

    points: tuple[CheckPoint, ...] = DEFAULT_POINTS

    def describe(self) -> str:
        """What the plan runs, for the log."""
        return f"{len(self.points)} trajectories"

    def calls(self, shape: ModelShape, rng: np.random.Generator) -> Iterator[PlannedCall]:
        """Per point: a prefill, then each chunk over the graph's own present."""
        for n, p in enumerate(self.points):
            ids_all = rng.integers(0, shape.vocab, size=(p.batch, sum(p.chunks)), dtype=np.int64)
            pad = np.array([*p.left_pad, *[0] * (p.batch - len(p.left_pad))])
            full_mask = (np.arange(sum(p.chunks))[None, :] >= pad[:, None]).astype(np.int64)
            done = 0
            for chunk in p.chunks:
                mask = full_mask[:, : done + chunk]
                inputs = {
                    "input_ids": ids_all[:, done : done + chunk],
                    "attention_mask": mask,
                    "position_ids": positions(mask)[:, -chunk:],
                }
                ref = RefCall(
                    sequence=n,
                    rows=slice(0, p.batch),
                    inputs=inputs,
                    valid_q=mask[:, -chunk:].astype(bool),
                    valid_kv=mask.astype(bool),
                    tag=f"B{p.batch} S{chunk} P{done}",
                )
                record = {"batch": p.batch, "seq": chunk, "past": done}
                yield PlannedCall(inputs, (ref,), record, reset=p.batch if done == 0 else None)
                done += chunk


@dataclass(frozen=True)
class SlotSchedule:
    """Static layout: slots written in place, each slot compared with PyTorch alone (batch 1).

    A write at the wrong position, a mask that leaks between slots, or a stale refill shows up
    as drift. Rows are right-padded; padding repeats the row's last real position
    (length-dependent RoPE reads the largest), as runtime/slots.py call_inputs does.
    """

    steps: tuple[tuple[tuple[int, bool], ...], ...] = STATIC_PLAN

    def describe(self) -> str:
        """What the plan runs, for the log."""
        return f"{len(self.steps)} steps over {len(self.steps[0])} slots"

    def calls(self, shape: ModelShape, rng: np.random.Generator) -> Iterator[PlannedCall]:
        """One call over every slot per step; a restart starts a new reference sequence."""
        slots = len(self.steps[0])
        length, sequence = [0] * slots, list(range(slots))
        for n_step, step in enumerate(self.steps):
            s = max(n for n, _ in step)
            ids = np.zeros((slots, s), np.int64)  # right padding: masked until overwritten
            toks = []
            for r, (n, restart) in enumerate(step):
                if restart and n_step > 0:
                    length[r], sequence[r] = 0, max(sequence) + 1
                toks.append(rng.integers(0, shape.vocab, size=n, dtype=np.int64))
                ids[r, :n] = toks[r]
            index = np.array(length, np.int64)
            real = np.array([n for n, _ in step])[:, None]
            pos = index[:, None] + np.minimum(np.arange(s)[None, :], real - 1)
            refs = tuple(
                RefCall(
                    sequence=sequence[r],
                    rows=slice(r, r + 1),
                    inputs={"input_ids": toks[r][None], "position_ids": pos[r : r + 1, :n]},
                    valid_q=np.ones((1, n), bool),
                    valid_kv=np.ones((1, length[r] + n), bool),
                    tag=f"step {n_step} slot {r} S{n} at {length[r]}",
                )
                for r, (n, _) in enumerate(step)
            )
            record = {"step": n_step, "tokens": [n for n, _ in step], "write_index": index.tolist()}
            inputs = {"input_ids": ids, "position_ids": pos, "write_index": index}
            yield PlannedCall(inputs, refs, record, reset=slots if n_step == 0 else None)
            for r, (n, _) in enumerate(step):
                length[r] += n


def check_parity(
    onnx_path: Path,
    model: Any,
    shape: ModelShape,
    *,
    precision: str = "fp32",
    plan: ParityPlan | None = None,
    seed: int = 0,
) -> tuple[ParityReport, list[dict[str, Any]]]:
    """Run a parity plan (default: the graph's layout's) through ORT and PyTorch; compare.

    Returns the report and per-call figures (the plan's record plus max |diff| of logits and
    K/V and the greedy agreement of the call).
    """
    run = stepper(onnx_path)
    if plan is None:
        from kiln.export.layouts import export_layout

        plan = export_layout(run.layout).parity
    tol = TOL[precision]
    # Dynamic-NTK RoPE in transformers remembers the longest sequence a module has seen; give
    # each reference sequence a fresh module so the reference is "this sequence alone".
    stateful = any(getattr(m, "rope_type", None) == "dynamic" for m in model.modules())
    refs: dict[int, list[Any]] = {}  # sequence -> [module, cache]
    diffs: list[Diff] = []
    agree: list[float] = []
    steps: list[dict[str, Any]] = []
    for call in plan.calls(shape, np.random.default_rng(seed)):
        if call.reset is not None:
            run.reset(call.reset)
        logits = run.feed(call.inputs)
        cache = run.cache()
        first, first_agree = len(diffs), len(agree)
        for ref in call.refs:
            module, past = refs.setdefault(
                ref.sequence, [copy.deepcopy(model) if stateful else model, None]
            )
            with torch.no_grad():
                out = module(
                    **{k: torch.from_numpy(v) for k, v in ref.inputs.items()},
                    past_key_values=past,
                    use_cache=True,
                )
            refs[ref.sequence][1] = out.past_key_values
            s = ref.valid_q.shape[1]
            ref_logits = out.logits.float().numpy()[ref.valid_q]
            got_logits = logits[ref.rows, :s][ref.valid_q]
            diffs.append(compare(f"logits[{ref.tag}]", ref_logits, got_logits, tol))
            agree.append(greedy_agreement(ref_logits, got_logits))
            end = ref.valid_kv.shape[1]
            for i, layer in enumerate(out.past_key_values.layers):
                for j, (kind, ref_kv) in enumerate((("key", layer.keys), ("value", layer.values))):
                    r = ref_kv.float().numpy()
                    kept = r.shape[2]  # a sliding-window reference cache keeps only its window
                    g = cache[2 * i + j][ref.rows, :, end - kept : end]
                    v = ref.valid_kv[:, end - kept :]
                    r, g = r.transpose(0, 2, 1, 3)[v], g.transpose(0, 2, 1, 3)[v]
                    diffs.append(compare(f"present.{i}.{kind}[{ref.tag}]", r, g, tol))
        step_diffs = diffs[first:]
        steps.append(
            {
                **call.record,
                "logits_max_abs": max(d.max_abs for d in step_diffs if d.name.startswith("logits")),
                "kv_max_abs": max(d.max_abs for d in step_diffs if d.name.startswith("present")),
                "greedy_agreement": float(np.mean(agree[first_agree:])),
            }
        )
        log.debug("parity %s: %s", call.refs[0].tag, step_diffs[0].describe())
    return ParityReport(precision, tol, diffs, float(np.mean(agree))), steps


def check_against_source(onnx_path: Path, source: Path, *, precision: str) -> ParityReport | None:
    """Parity of a graph against the PyTorch model folder it came from (None: folder gone).

    The check of `kiln export`, for later stages: the plan of the graph's layout, judged by
    TOL[precision].
    """
    if not (Path(source) / "config.json").is_file():
        return None
    from kiln.export.source import describe_source, load_model

    src = describe_source(Path(source))
    model = load_model(src.path)
    report, _ = check_parity(onnx_path, model, src.family.shape(model.config), precision=precision)
    return report
