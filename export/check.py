"""Parity of an exported graph against the PyTorch model it came from, run through ONNX Runtime.

The reference is transformers' own forward with its own cache, not the export wrapper, so a
wrong cache contract in the wrapper shows up as drift. A layout's parity plan (export/layouts.py)
says which graph calls to make and which PyTorch forwards each is compared with; one driver,
`check_parity`, runs any plan through the layout's stepper (kiln/graph_io.py), continuing from
the graph's own cache as a decode loop would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kiln.graph_io import positions, stepper
from kiln.models.families import ModelShape
from kiln.parity import TOL, Diff, ParityReport, compare, compare_to_float64, greedy_agreement
from kiln.precisions import Tol

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

    When TOL[precision] judges against float64 (fp32), a float64 twin of the model runs the same
    forwards with its own cache, and each output is judged by PyTorch fp32's own error against
    it (kiln/parity.py compare_to_float64); otherwise the graph is compared with PyTorch fp32.
    Returns the report and per-call figures (the plan's record plus max |diff| of logits and
    K/V and the greedy agreement of the call).
    """
    run = stepper(onnx_path)
    if plan is None:
        from kiln.export.layouts import export_layout

        plan = export_layout(run.layout).parity
    tol = TOL[precision]
    refs = _References(model, float64=tol.noise is not None)
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
            outs = refs.forward(ref)
            s = ref.valid_q.shape[1]
            ref_logits = [_numpy(o.logits)[ref.valid_q] for o in outs]
            got_logits = logits[ref.rows, :s][ref.valid_q]
            diffs.append(_judge(f"logits[{ref.tag}]", ref_logits, got_logits, tol))
            agree.append(greedy_agreement(ref_logits[0], got_logits))
            end = ref.valid_kv.shape[1]
            for i, layers in enumerate(zip(*(o.past_key_values.layers for o in outs), strict=True)):
                for j, kind in enumerate(("key", "value")):
                    ref_kv = [_numpy(lay.keys if j == 0 else lay.values) for lay in layers]
                    kept = ref_kv[0].shape[2]  # a sliding-window cache keeps only its window
                    g = cache[2 * i + j][ref.rows, :, end - kept : end]
                    v = ref.valid_kv[:, end - kept :]
                    r = [x.transpose(0, 2, 1, 3)[v] for x in ref_kv]
                    got = g.transpose(0, 2, 1, 3)[v]
                    diffs.append(_judge(f"present.{i}.{kind}[{ref.tag}]", r, got, tol))
        step_diffs = diffs[first:]
        steps.append(
            {
                **call.record,
                **_step_figures(step_diffs),
                "greedy_agreement": float(np.mean(agree[first_agree:])),
            }
        )
        log.debug("parity %s: %s", call.refs[0].tag, step_diffs[0].describe())
    return ParityReport(precision, tol, diffs, float(np.mean(agree))), steps


class _References:
    """PyTorch forwards of the reference sequences: fp32, and float64 when asked, each cached.

    The references are new modules holding the model's weights (_twin), not the module that was
    traced: tracing can leave state on it (a longrope rotary module traced without
    export/patches.py keeps a FakeTensor `long_inv_freq`), and PyTorch would then be a wrong
    reference. Dynamic-NTK RoPE in transformers remembers the longest sequence a module has
    seen; each reference sequence then gets its own modules so the reference is "this sequence
    alone".
    """

    def __init__(self, model: Any, *, float64: bool) -> None:
        self.model = model
        self.dtypes = (torch.float32, torch.float64) if float64 else (torch.float32,)
        self.stateful = any(getattr(m, "rope_type", None) == "dynamic" for m in model.modules())
        self.shared = [] if self.stateful else [_twin(model, d) for d in self.dtypes]
        self.seqs: dict[int, list[list[Any]]] = {}  # sequence -> per model [module, cache]

    def forward(self, ref: RefCall) -> list[Any]:
        """The outputs of each model (fp32 first) on `ref`, continuing its sequence's cache."""
        if ref.sequence not in self.seqs:
            models = self.shared or [_twin(self.model, d) for d in self.dtypes]
            self.seqs[ref.sequence] = [[m, None] for m in models]
        state = self.seqs[ref.sequence]
        outs = []
        for entry in state:
            module, past = entry
            with torch.no_grad():
                out = module(
                    **{k: torch.from_numpy(v) for k, v in ref.inputs.items()},
                    past_key_values=past,
                    use_cache=True,
                )
            entry[1] = out.past_key_values
            outs.append(out)
        return outs


def _twin(model: Any, dtype: torch.dtype) -> Any:
    """A new module of `model`'s class and config holding its weights in `dtype`, in eval mode.

    Made by the class's constructor (weights not initialized, then loaded), so no state a
    forward or a trace left on `model` comes along. fp32 shares the weights' storage; float64
    copies them (8 bytes per parameter: 1.1 GB for a 135M-parameter model).
    """
    from transformers.initialization import no_init_weights

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            twin = type(model)(model.config)
    finally:
        torch.set_default_dtype(default)
    twin.load_state_dict(model.state_dict(), assign=dtype == torch.float32)
    return twin.to(dtype).eval()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A reference tensor as numpy: float64 kept, any other float type as float32."""
    return (t if t.dtype == torch.float64 else t.float()).numpy()


def _judge(name: str, refs: list[np.ndarray], got: np.ndarray, tol: Tol) -> Diff:
    """fp32 reference alone: compare; with a float64 one: judge by PyTorch fp32's own error."""
    if len(refs) == 1:
        return compare(name, refs[0], got, tol)
    return compare_to_float64(name, refs[1], refs[0], got, tol)


def _step_figures(diffs: list[Diff]) -> dict[str, float]:
    """Worst logit and K/V errors of one call (and PyTorch fp32's, against float64)."""
    out = {}
    for key, prefix in (("logits", "logits"), ("kv", "present")):
        mine = [d for d in diffs if d.name.startswith(prefix)]
        out[f"{key}_max_abs"] = max(d.max_abs for d in mine)
        if mine[0].torch_max_abs is not None:
            out[f"torch_fp32_{key}_max_abs"] = max(d.torch_max_abs or 0.0 for d in mine)
    return out


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
