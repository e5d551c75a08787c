"""Fixed probe inputs run through ONNX Runtime CPU: the runner's drift measurement.

Two calls per graph, batch 2, through the graph's layout stepper (kiln/graph_io.py): a ragged
prefill of 6 tokens, then a 3-token continuation over the *source* graph's own cache (so every
graph sees identical inputs, cast to its K/V dtype). Logits at padding positions are dropped.
- concat: row 1 left-padded by 2 (masked out);
- static: 2 slots writing 6 and 4 real tokens at write_index 0 (slot 1 right-padded, padding
  repeating its last position), then 3 more each at write_index (6, 4).
Letters: B rows, S new tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.graph_io import Stepper, ort_session, positions, stepper
from kiln.layouts import CONCAT, STATIC

# A probe call: the graph's leading inputs by name, and which query positions are real [B, S].
ProbeCall = tuple[dict[str, np.ndarray], np.ndarray]


def ort_session_from_ir(model: ir.Model) -> Any:
    """The probe's ONNX Runtime CPU session over an in-memory model: ORT optimizations off.

    Run the graph as written: ORT's own fusions (Gelu, attention, ...) would otherwise turn the
    unfused and the fused graph into the same kernels and hide a pass's drift.
    """
    return ort_session(model, optimization="off")


def _concat_calls(ids: np.ndarray) -> list[ProbeCall]:
    mask = np.ones((2, 9), np.int64)
    mask[1, :2] = 0
    first = {"input_ids": ids[:, :6], "attention_mask": mask[:, :6]}
    first["position_ids"] = positions(first["attention_mask"])
    second = {
        "input_ids": ids[:, 6:],
        "attention_mask": mask,
        "position_ids": positions(mask)[:, 6:],
    }
    return [(first, mask[:, :6].astype(bool)), (second, mask[:, 6:].astype(bool))]


def _static_calls(ids: np.ndarray) -> list[ProbeCall]:
    real = np.array([6, 4])
    valid = np.arange(6)[None, :] < real[:, None]
    first = {
        "input_ids": np.where(valid, ids[:, :6], 0),
        "position_ids": np.minimum(np.arange(6)[None, :], real[:, None] - 1).astype(np.int64),
        "write_index": np.zeros(2, np.int64),
    }
    second = {
        "input_ids": ids[:, 6:],
        "position_ids": (real[:, None] + np.arange(3)[None, :]).astype(np.int64),
        "write_index": real.astype(np.int64),
    }
    return [(first, valid), (second, np.ones((2, 3), bool))]


_PROBE_CALLS: dict[str, Callable[[np.ndarray], list[ProbeCall]]] = {
    CONCAT.name: _concat_calls,
    STATIC.name: _static_calls,
}


@dataclass
class OnnxProbe:
    """Probe logits of an `ir.Model`; `prepare` maps graphs ORT cannot run (bf16) to ones it can.

    The first graph probed is the source: its cache after the first call is fed to every graph's
    second call.
    """

    vocab: int
    seed: int = 0
    prepare: Callable[[ir.Model], ir.Model] | None = None
    _calls: list[ProbeCall] = field(default_factory=list)
    _source_cache: list[np.ndarray] = field(default_factory=list)

    def _stepper(self, model: ir.Model) -> Stepper:
        runnable = self.prepare(model) if self.prepare else model
        return stepper(ort_session_from_ir(runnable), rows=2)

    def logits(self, model: ir.Model) -> list[np.ndarray]:
        """Float32 logits of each probe call at real (unpadded) positions, [positions, V]."""
        run = self._stepper(model)
        if not self._calls:
            ids = np.random.default_rng(self.seed).integers(3, self.vocab, (2, 9), np.int64)
            self._calls = _PROBE_CALLS[run.layout.name](ids)
        out = []
        for n, (inputs, valid) in enumerate(self._calls):
            if n == 1:
                if not self._source_cache:
                    self._source_cache = [c.astype(np.float32) for c in run.cache()]
                run.load_cache(self._source_cache)
            out.append(run.feed(inputs)[valid])
        return out
