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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, KilnError
from kiln.runtime.slots import SlotFeed

log = logging.getLogger(__name__)

_NP_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
PAD_TOKEN = 0  # any valid id: padding rows are written past a slot's length and stay masked
# ORT's TensorScatter CPU kernel logs this (WARNING) when present is not past's buffer.
_COPY_LOG = re.compile(
    r"in-place optimization not activated, copying past_cache to present_cache \((\d+) bytes\)"
)


def scatter_copy_bytes(ort_log: str) -> int:
    """Bytes ORT's TensorScatter copied past -> present, summed from its log (0: in place)."""
    return sum(int(n) for n in _COPY_LOG.findall(ort_log))


@dataclass(frozen=True)
class _Call:
    """One graph call: the slot range it binds and the feeds it carries (others idle)."""

    lo: int
    hi: int
    feeds: tuple[SlotFeed, ...]
    width: int  # S


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
        self._validate(feeds)
        out = np.empty((len(feeds), self.vocab), np.float32)
        order = {f.slot: n for n, f in enumerate(feeds)}
        for call in self._plan(feeds):
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

    # -- planning ------------------------------------------------------------------------------

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.slots:
            raise KilnError(
                f"Slot {slot} is out of range: this backend holds slots 0..{self.slots - 1}; "
                f"use a slot below {self.slots} or load with more slots."
            )

    def _validate(self, feeds: Sequence[SlotFeed]) -> None:
        seen: set[int] = set()
        for f in feeds:
            self._check_slot(f.slot)
            if f.slot in seen:
                raise KilnError(
                    f"Slot {f.slot} is fed twice in one step; merge its tokens into one SlotFeed."
                )
            seen.add(f.slot)
            if len(f.tokens) == 0:
                raise KilnError(
                    f"Slot {f.slot} is fed no tokens; feed at least one token or leave the slot "
                    "out of this step."
                )
            bad = [t for t in f.tokens if not 0 <= int(t) < self.vocab]
            if bad:
                raise KilnError(
                    f"Slot {f.slot}: token id {bad[0]} is outside the vocabulary "
                    f"(0..{self.vocab - 1}); encode the prompt with this artifact's tokenizer."
                )
            start = 0 if f.restart else self._lengths[f.slot]
            if start + len(f.tokens) > self.max_context:
                raise KilnError(
                    f"Slot {f.slot} holds {start} positions; {len(f.tokens)} more would pass this "
                    f"artifact's max context of {self.max_context}. Release or restart the slot, "
                    "shorten the input, or re-export with a larger --max-context."
                )

    def _plan(self, feeds: Sequence[SlotFeed]) -> list[_Call]:
        """Split a step into calls: wide feeds (prefill) first, then one-token feeds (decode).

        Each group runs as one call over the slot range it spans when every row in that range
        fits the width and padding is at most half the work; otherwise one call per feed.
        """
        wide = [f for f in feeds if len(f.tokens) > 1 or f.restart]
        narrow = [f for f in feeds if not (len(f.tokens) > 1 or f.restart)]
        lengths = list(self._lengths)
        calls: list[_Call] = []
        for group in (wide, narrow):
            if not group:
                continue
            calls += self._group_calls(group, lengths)
            for f in group:
                lengths[f.slot] = (0 if f.restart else lengths[f.slot]) + len(f.tokens)
        return calls

    def _group_calls(self, group: list[SlotFeed], lengths: list[int]) -> list[_Call]:
        lo = min(f.slot for f in group)
        hi = max(f.slot for f in group) + 1
        width = max(len(f.tokens) for f in group)
        fed = {f.slot: f for f in group}
        starts = [
            (0 if fed[s].restart else lengths[s]) if s in fed else lengths[s] for s in range(lo, hi)
        ]
        real = sum(len(f.tokens) for f in group)
        fits = all(start + width <= self.max_context for start in starts)
        if fits and (hi - lo) * width <= 2 * real:
            return [_Call(lo, hi, tuple(sorted(group, key=lambda f: f.slot)), width)]
        return [_Call(f.slot, f.slot + 1, (f,), len(f.tokens)) for f in group]

    # -- running -------------------------------------------------------------------------------

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

    def _run(self, call: _Call) -> np.ndarray:
        """One graph call over slots [lo, hi); logits_NV at each fed slot's last token."""
        rows, s = call.hi - call.lo, call.width
        ids = np.full((rows, s), PAD_TOKEN, np.int64)
        pos = np.empty((rows, s), np.int64)
        index = np.empty(rows, np.int64)
        last = np.zeros(len(call.feeds), np.int64)
        fed = {f.slot: (i, f) for i, f in enumerate(call.feeds)}
        for r, slot in enumerate(range(call.lo, call.hi)):
            if slot in fed:
                i, f = fed[slot]
                start, n = (0 if f.restart else self._lengths[slot]), len(f.tokens)
                ids[r, :n] = f.tokens
                last[i] = n - 1
            else:  # idle: one padding row at its length, masked until overwritten
                start, n = self._lengths[slot], 1
            index[r] = start
            # Padding repeats the last real position (length-dependent RoPE reads the largest).
            pos[r] = start + np.minimum(np.arange(s), n - 1)
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
        for f in call.feeds:
            self._lengths[f.slot] = (0 if f.restart else self._lengths[f.slot]) + len(f.tokens)
        rows_N = np.array([f.slot - call.lo for f in call.feeds])
        return logits_RSV[rows_N, last].astype(np.float32, copy=False)
