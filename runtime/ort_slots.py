"""ONNX Runtime slot backend: a static-KV graph whose cache is written in place, step after step.

The `[slots, Hkv, max_context, D]` K/V buffers are allocated once, zeroed (masked positions must
hold finite numbers: a NaN there would survive the mask), and bound by address with IO binding
as BOTH the `past` input and the `present` output of the same layer. ONNX Runtime's
TensorScatter kernel then sees destination == source and skips its cache copy (its CPU kernel
logs "in-place optimization not activated, copying ... bytes" otherwise), so a step allocates
nothing and copies nothing but the new rows. Logits go to a preallocated host buffer.

Slots are the outermost axis, so any contiguous range of slots is a contiguous piece of each
buffer: a call binds only the range [lo, hi) that covers the fed slots (pointer + lo * stride),
and slots outside it cost nothing. Slots inside it that are not fed idle on one padding token
written at their length, where it stays masked until overwritten.

Letters in names: N feeds, R rows in one call, S new tokens, M max_context, V vocab.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, KilnError
from kiln.runtime.slots import SlotCall, SlotFeed, advance, call_inputs, check_feeds, plan_calls

log = logging.getLogger(__name__)

_NP_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# ORT's TensorScatter CPU kernel logs this (WARNING) when present is not past's buffer.
_COPY_LOG = re.compile(
    r"in-place optimization not activated, copying past_cache to present_cache \((\d+) bytes\)"
)


def scatter_copy_bytes(ort_log: str) -> int:
    """Bytes ORT's TensorScatter copied past -> present, summed from its log (0: in place)."""
    return sum(int(n) for n in _COPY_LOG.findall(ort_log))


class OrtSlotBackend:
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
        import onnxruntime as ort

        from kiln.runtime.ort_backend import resolve_device

        if slots < 1:
            raise KilnError(f"slots={slots}: a slot backend needs at least 1 slot.")
        device = resolve_device(device)
        opts = ort.SessionOptions()
        opts.log_severity_level = log_severity
        if threads:
            opts.intra_op_num_threads = threads
        # Spinning threads keep a core each between ops: on an idle host that is faster (smollm
        # static decode +27%, quiet 2 cores), but with anything else on the CPU (a server's HTTP
        # loop, other processes) it halved decode speed (86 -> 47 ms per step at load 5). ORT
        # spins by default; the server turns it off.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
        ep = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else []
        self.session = ort.InferenceSession(
            str(onnx_path), opts, providers=ep or ["CPUExecutionProvider"]
        )
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "write_index" not in inputs:
            raise ArtifactError(
                f"{onnx_path} is a concat-KV graph (no write_index input); the slot backend needs "
                "a static one: re-export with `kiln export MODEL --kv static --max-context N`."
            )
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [
            o.name for o in self.session.get_outputs() if o.name.startswith("present.")
        ]
        first = inputs[self.past_names[0]]
        self.kv_dtype = _NP_DTYPE[first.type]
        hkv, m, d = (int(x) for x in first.shape[1:])
        self.name = f"onnxruntime-{device}-static"
        self.device = device
        self.slots = slots
        self.max_context = m
        logits_out = self.session.get_outputs()[0]
        self.vocab = int(logits_out.shape[-1])
        self.logits_dtype = _NP_DTYPE[logits_out.type]  # float16 for an fp16 export
        self._lengths = [0] * slots
        self._row_shape = (hkv, m, d)
        self._slot_bytes = hkv * m * d * np.dtype(self.kv_dtype).itemsize
        # Allocated once and zeroed; on CPU the OrtValue wraps (and keeps) its numpy array.
        self.buffers = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((slots, hkv, m, d), self.kv_dtype), device, 0)
            for _ in self.past_names
        ]
        self._logits = np.empty(slots * self.vocab, self.logits_dtype)  # grown for wide prefills
        self._bindings: dict[tuple[int, int], Any] = {}
        self._last_binding: Any = None
        log.debug("static KV: %d slots x %d positions, %.1f MiB", slots, m, self.kv_bytes / 2**20)

    @property
    def kv_bytes(self) -> int:
        """Bytes held by all K/V buffers (allocated once at load)."""
        return self._slot_bytes * self.slots * len(self.buffers)

    def length(self, slot: int) -> int:
        """Positions this slot's sequence holds now (0 when free or just restarted)."""
        self._check_slot(slot)
        return self._lengths[slot]

    def release(self, slot: int) -> None:
        """Mark a slot free; its rows are overwritten by the next sequence written there."""
        self._check_slot(slot)
        self._lengths[slot] = 0

    def step(self, feeds: Sequence[SlotFeed]) -> np.ndarray:
        """Run the feeds (validated first, buffers untouched on error); logits_NV, feed order."""
        check_feeds(feeds, self._lengths, vocab=self.vocab, max_context=self.max_context)
        out = np.empty((len(feeds), self.vocab), np.float32)
        order = {f.slot: n for n, f in enumerate(feeds)}
        for call in plan_calls(feeds, self._lengths, self.max_context):
            for feed, logits_V in zip(call.feeds, self._run(call), strict=True):
                out[order[feed.slot]] = logits_V
        return out

    def buffer_ptrs(self) -> list[int]:
        """Device addresses of the K/V buffers (the past of every step, by design)."""
        return [v.data_ptr() for v in self.buffers]

    def present_ptrs(self) -> list[int]:
        """Addresses ORT wrote the last step's presents to, at slot 0 of the bound range."""
        assert self._last_binding is not None, "no step has run yet"
        binding, lo = self._last_binding
        outs = binding.get_outputs()[: len(self.present_names)]  # bound before the logits
        return [v.data_ptr() - lo * self._slot_bytes for v in outs]

    def read_slot(self, slot: int, index: int) -> np.ndarray:
        """Host copy of one slot of K/V buffer `index` [Hkv, M, D] (tests and debugging)."""
        self._check_slot(slot)
        return self.buffers[index].numpy()[slot].copy()

    def end_profiling(self) -> str | None:
        """Stop ORT's profiler (when enabled) and return the JSON trace path."""
        opts = self.session.get_session_options()
        return self.session.end_profiling() if opts.enable_profiling else None

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise KilnError(
                f"Slot {slot} is out of range: this backend holds slots 0..{self.slots - 1}; "
                f"use a slot below {self.slots} or load with more slots."
            )

    def _binding(self, lo: int, hi: int) -> Any:
        """IO binding of slots [lo, hi): past and present of each layer at the same address."""
        key = (lo, hi)
        if key not in self._bindings:
            binding = self.session.io_binding()
            shape = (hi - lo, *self._row_shape)
            for past, present, value in zip(
                self.past_names, self.present_names, self.buffers, strict=True
            ):
                ptr = value.data_ptr() + lo * self._slot_bytes
                binding.bind_input(past, self.device, 0, self.kv_dtype, shape, ptr)
                binding.bind_output(present, self.device, 0, self.kv_dtype, shape, ptr)
            self._bindings[key] = binding
        return self._bindings[key]

    def _run(self, call: SlotCall) -> np.ndarray:
        """One graph call over slots [lo, hi); logits_NV at each fed slot's last token."""
        ids, pos, index, pick = call_inputs(call, self._lengths)
        rows, s = ids.shape
        if self._logits.size < rows * s * self.vocab:
            self._logits = np.empty(rows * s * self.vocab, self.logits_dtype)
        logits_RSV = self._logits[: rows * s * self.vocab].reshape(rows, s, self.vocab)
        binding = self._binding(call.lo, call.hi)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("position_ids", pos)
        binding.bind_cpu_input("write_index", index)
        binding.bind_output(
            "logits", "cpu", 0, self.logits_dtype, logits_RSV.shape, logits_RSV.ctypes.data
        )
        self.session.run_with_iobinding(binding)
        self._last_binding = (binding, call.lo)
        advance(self._lengths, call)
        return logits_RSV[pick[:, 0], pick[:, 1]].astype(np.float32, copy=False)
