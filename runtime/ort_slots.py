"""ONNX Runtime slot backend: a static-KV graph whose cache is written in place, step after step.

The `[slots, Hkv, max_context, D]` K/V buffers are allocated once and bound as BOTH the `past`
input and the `present` output of their layer, so ONNX Runtime's TensorScatter writes in place
(kiln/graph_io.py StaticStepper holds the buffers and the bindings). This backend keeps each
slot's length and plans a step into calls over slot ranges [lo, hi) (runtime/slots.py); slots
inside a range that are not fed idle on one padding token written at their length, where it
stays masked until overwritten.

Letters in names: N feeds, R rows in one call, S new tokens, M max_context, V vocab.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError
from kiln.graph_io import StaticStepper, ort_session
from kiln.layouts import STATIC, layout_of_inputs
from kiln.runtime.slots import SlotCall, SlotRunner

log = logging.getLogger(__name__)

# ORT's TensorScatter CPU kernel logs this (WARNING) when present is not past's buffer.
_COPY_LOG = re.compile(
    r"in-place optimization not activated, copying past_cache to present_cache \((\d+) bytes\)"
)


def scatter_copy_bytes(ort_log: str) -> int:
    """Bytes ORT's TensorScatter copied past -> present, summed from its log (0: in place)."""
    return sum(int(n) for n in _COPY_LOG.findall(ort_log))


class OrtSlotBackend(SlotRunner):
    """A static-layout model.onnx with `slots` rows of preallocated, in-place K/V buffers."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        slots: int = 4,
        device: str = "auto",
        threads: int = 0,
        profile_dir: Path | None = None,
        log_severity: int = 3,
        spin: bool = True,
    ) -> None:
        # spin=False on a shared host (the server): see kiln/graph_io.py ort_session.
        session = ort_session(
            onnx_path,
            device=device,
            threads=threads,
            spin=spin,
            profile_dir=profile_dir,
            log_severity=log_severity,
        )
        if layout_of_inputs([i.name for i in session.get_inputs()]) is not STATIC:
            raise ArtifactError(
                f"{onnx_path} is a concat-KV graph (no write_index input); the slot backend needs "
                "a static one: re-export with `kiln export MODEL --kv static --max-context N`."
            )
        self.stepper = StaticStepper(session, rows=max(slots, 1))
        super().__init__(
            slots=slots, max_context=self.stepper.max_context, vocab=self.stepper.vocab
        )
        self.session = session
        self.past_names = self.stepper.past_names
        self.present_names = self.stepper.present_names
        self.kv_dtype = self.stepper.kv_dtype
        self.device = self.stepper.device
        self.name = f"onnxruntime-{self.device}-static"
        self.logits_dtype = self.stepper.logits_dtype  # float16 for an fp16 export
        log.debug(
            "static KV: %d slots x %d positions, %.1f MiB",
            slots,
            self.max_context,
            self.kv_bytes / 2**20,
        )

    @property
    def buffers(self) -> list[Any]:
        """The K/V buffers (OrtValues), one per past input, allocated once at load."""
        return self.stepper.buffers

    @property
    def kv_bytes(self) -> int:
        """Bytes held by all K/V buffers (allocated once at load)."""
        return self.stepper.kv_bytes

    def buffer_ptrs(self) -> list[int]:
        """Device addresses of the K/V buffers (the past of every step, by design)."""
        return self.stepper.buffer_ptrs()

    def present_ptrs(self) -> list[int]:
        """Addresses ORT wrote the last step's presents to, at slot 0 of the bound range."""
        return self.stepper.present_ptrs()

    def read_slot(self, slot: int, index: int) -> np.ndarray:
        """Host copy of one slot of K/V buffer `index` [Hkv, M, D] (tests and debugging)."""
        self.length(slot)  # range check
        return np.array(self.buffers[index].numpy()[slot])  # a copy

    def end_profiling(self) -> str | None:
        """Stop ORT's profiler (when enabled) and return the JSON trace path."""
        opts = self.session.get_session_options()
        return self.session.end_profiling() if opts.enable_profiling else None

    def _execute(
        self, call: SlotCall, ids: np.ndarray, pos: np.ndarray, index: np.ndarray, pick: np.ndarray
    ) -> np.ndarray:
        """One graph call over slots [lo, hi); logits_NV at each fed slot's last token."""
        logits_RSV = self.stepper.run(ids, pos, index, lo=call.lo)
        logits_NV: np.ndarray = logits_RSV[pick[:, 0], pick[:, 1]]  # numpy types fancy indexing Any
        return logits_NV.astype(np.float32, copy=False)
