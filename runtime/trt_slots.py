"""TensorRT slot backend: a static-KV engine whose cache IKVCacheUpdateLayer writes in place.

NOT RUN by the author (no GPU on the machine it was written on); `make gpu-check` runs it
against ONNX Runtime on a GPU host. The host-side work (feed validation, splitting a step into
calls, the ids/positions/write_index of a call, the engine.json reading) is plain Python and
numpy: the step loop is runtime/slots.py's SlotRunner, shared with the ONNX Runtime slot
backend, and is tested on CPU (tests/engine/test_engine_static_runtime.py drives it with ONNX
Runtime as the executor).

The `[slots, Hkv, max_context, D]` buffers are allocated once with cuda-python and zeroed (a
NaN in a masked position would survive the mask). TensorRT requires a KV-cache update's output
to share its input's device address (TensorRT-RTX docs, IKVCacheUpdateLayer), so each
present.* is bound to its past input's pointer (engine.json kv_cache.aliases): a step copies
ids, positions, write indices in and one logits row per fed slot out, nothing else. As in the
ONNX Runtime slot backend (runtime/ort_slots.py), a call binds only the slot range [lo, hi) it
needs (pointer + lo * slot stride; slots are the outermost axis), idle slots inside the range
write padding at their length (masked until overwritten), and prefill feeds run before decode
feeds so each call's width S fits an optimization profile (prefill: S up to its max_sequence;
decode: S = 1).

Letters in names: N feeds, R rows in one call, S new tokens, M max_context, V vocab.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, KilnError
from kiln.manifests import EngineManifest
from kiln.runtime.cuda_mem import DeviceBuffer, Stream
from kiln.runtime.slots import SlotCall, SlotFeed, SlotRunner, check_feeds
from kiln.runtime.trt_backend import (
    deserialize_plan,
    load_runtime_cache,
    new_context,
    np_dtype,
    save_runtime_cache_file,
    set_shape,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotSpec:
    """What engine.json says about a static engine: shapes, names, profiles."""

    max_context: int
    max_slots: int
    vocab: int
    kv_heads: int
    head_dim: int
    kv_dtype: str
    logits_dtype: str
    aliases: dict[str, str]  # present -> past
    profiles: tuple[tuple[int, str, int], ...]  # (index, name, max new tokens)

    @property
    def max_new(self) -> int:
        """Most new tokens one slot may take in one call (the widest profile)."""
        return max(s for _, _, s in self.profiles)

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot's row in one K or V buffer."""
        return self.kv_heads * self.max_context * self.head_dim * np.dtype(self.kv_dtype).itemsize


def slot_spec(manifest: EngineManifest, where: Path | str = "engine.json") -> SlotSpec:
    """Read a static engine's SlotSpec; refuse concat engines and manifests without aliasing."""
    kv = manifest.kv_cache
    if not manifest.layout.has_slots:
        raise ArtifactError(
            f"{where} is a {manifest.layout.name}-KV engine; the slot backend needs one "
            "built from a static export (`kiln export MODEL --kv static --max-context N`, then "
            "`kiln build`). Load a concat engine with kiln.runtime.load instead."
        )
    if not kv["present_aliases_past"] or not kv.get("aliases"):
        raise ArtifactError(
            f"{where} does not record in-place KV updates (kv_cache.aliases); rebuild it with "
            "this kiln's `kiln build`."
        )
    io = {v["name"]: v for v in manifest.io["inputs"] + manifest.io["outputs"]}
    past = io[next(iter(kv["aliases"].values()))]
    profiles = tuple(
        (int(p["index"]), p["name"], int(p["axes"]["sequence"][2]))
        for p in manifest.optimization_profiles
    )
    return SlotSpec(
        max_context=int(kv["max_context"]),
        max_slots=int(kv["slots"]["max"]),
        vocab=int(io["logits"]["shape"][-1]),
        kv_heads=int(past["shape"][1]),
        head_dim=int(past["shape"][3]),
        kv_dtype=past["dtype"],
        logits_dtype=io["logits"]["dtype"],
        aliases=dict(kv["aliases"]),
        profiles=profiles,
    )


def pick_profile(spec: SlotSpec, width: int) -> int:
    """The optimization profile for calls of `width` new tokens: decode for 1, else prefill."""
    fitting = [(i, n) for i, n, s in spec.profiles if width <= s]
    if not fitting:
        raise KilnError(f"No optimization profile takes {width} new tokens (max {spec.max_new}).")
    prefer = "decode" if width == 1 else "prefill"
    return min(fitting, key=lambda p: (p[1] != prefer, p[0]))[0]


def validate_feeds(
    feeds: Sequence[SlotFeed], lengths: Sequence[int], spec: SlotSpec, slots: int
) -> None:
    """The slot checks (kiln.runtime.slots.check_feeds) plus the engine's widest call."""
    check_feeds(feeds, list(lengths)[:slots], vocab=spec.vocab, max_context=spec.max_context)
    for f in feeds:
        if len(f.tokens) > spec.max_new:
            raise KilnError(
                f"Slot {f.slot} is fed {len(f.tokens)} tokens, more than this engine's "
                f"optimization profiles take in one call ({spec.max_new}); feed the prompt in "
                f"chunks of at most {spec.max_new}, or rebuild with a larger [profile.prefill] "
                "max_sequence."
            )


class EngineSlots(SlotRunner):
    """The host side of a static engine: the SlotRunner loop with the engine's limits.

    Subclasses implement `_execute` (runtime/slots.py SlotRunner).
    """

    def __init__(self, spec: SlotSpec, slots: int) -> None:
        if not 1 <= slots <= spec.max_slots:
            raise KilnError(
                f"slots={slots}: this engine's optimization profiles take 1..{spec.max_slots} "
                "rows per call; load with fewer slots or rebuild with a larger max_batch in "
                "the GPU profile."
            )
        super().__init__(slots=slots, max_context=spec.max_context, vocab=spec.vocab)
        self.spec = spec

    def check(self, feeds: Sequence[SlotFeed]) -> None:
        """The slot checks plus the engine's widest call (`validate_feeds`)."""
        validate_feeds(feeds, self._lengths, self.spec, self.slots)


class TrtSlotBackend(EngineSlots):
    """A static-KV engine with `slots` rows of device K/V buffers written in place."""

    def __init__(
        self,
        folder: Path,
        manifest: EngineManifest,
        trt: Any,
        *,
        slots: int = 4,
        cuda_graph: bool = False,
    ) -> None:
        super().__init__(slot_spec(manifest, folder / "engine.json"), slots)
        spec = self.spec
        self.trt, self.folder = trt, folder
        self.name = f"{trt.__name__}-{manifest.profile_name}-static"
        self._runtime, self.engine = deserialize_plan(trt, folder)
        self.stream = Stream()
        self._cache_path = folder / "runtime.cache"
        rtx = trt.__name__ == "tensorrt_rtx"
        self._runtime_cache = load_runtime_cache(self.engine, self._cache_path) if rtx else None
        self.contexts = {
            i: new_context(
                self.engine, trt, i, self.stream, self._runtime_cache, cuda_graph and n == "decode"
            )
            for i, n, _ in spec.profiles
        }
        # One buffer per past input, zeroed: masked positions must hold finite numbers.
        self.kv = {past: DeviceBuffer(slots * spec.slot_bytes) for past in spec.aliases.values()}
        for buf in self.kv.values():
            self.stream.memset(buf.ptr, 0, buf.nbytes)
        width = spec.max_new
        self.ids, self.pos = DeviceBuffer(slots * width * 8), DeviceBuffer(slots * width * 8)
        self.index = DeviceBuffer(slots * 8)
        self._item = np.dtype(np_dtype(spec.logits_dtype)).itemsize
        self.logits = DeviceBuffer(slots * width * spec.vocab * self._item)
        self.stream.synchronize()
        log.info(
            "%s: %d slots x %d positions, %d K/V buffers of %.1f MiB (bound as past and present)",
            self.name, slots, spec.max_context, len(self.kv), slots * spec.slot_bytes / 2**20,
        )  # fmt: skip

    def _execute(
        self, call: SlotCall, ids: np.ndarray, pos: np.ndarray, index: np.ndarray, pick: np.ndarray
    ) -> np.ndarray:
        """One engine call over slots [lo, hi); logits_NV at each fed slot's last token."""
        spec, st = self.spec, self.stream
        rows, s = ids.shape
        ctx = self.contexts[pick_profile(spec, s)]
        for name, arr, buf in (
            ("input_ids", ids, self.ids),
            ("position_ids", pos, self.pos),
            ("write_index", index, self.index),
        ):
            st.to_device(buf.ptr, arr)
            set_shape(ctx, name, arr.shape)
            ctx.set_tensor_address(name, buf.ptr)
        offset, shape = (
            call.lo * spec.slot_bytes,
            (rows, spec.kv_heads, spec.max_context, spec.head_dim),
        )
        for present, past in spec.aliases.items():
            ptr = self.kv[past].ptr + offset
            set_shape(ctx, past, shape)
            ctx.set_tensor_address(past, ptr)
            ctx.set_tensor_address(present, ptr)  # IKVCacheUpdateLayer: same address, in place
        ctx.set_tensor_address("logits", self.logits.ptr)
        if not ctx.execute_async_v3(st.ptr):
            raise KilnError(f"TensorRT execution failed for slots {call.lo}..{call.hi - 1}, S={s}.")
        out = np.empty((len(pick), spec.vocab), np_dtype(spec.logits_dtype))
        row_bytes = spec.vocab * self._item
        for n, (r, t) in enumerate(pick):
            st.to_host(out[n], self.logits.ptr + (int(r) * s + int(t)) * row_bytes)
        st.synchronize()
        return out.astype(np.float32)

    def buffer_ptrs(self) -> list[int]:
        """Device addresses of the K/V buffers, bound as past AND present of every call."""
        return [b.ptr for b in self.kv.values()]

    def read_slot(self, slot: int, index: int) -> np.ndarray:
        """Host copy of one slot of K/V buffer `index` [Hkv, M, D] (checks and debugging)."""
        self.length(slot)  # range check
        spec = self.spec
        out = np.empty((spec.kv_heads, spec.max_context, spec.head_dim), np_dtype(spec.kv_dtype))
        self.stream.to_host(out, list(self.kv.values())[index].ptr + slot * spec.slot_bytes)
        self.stream.synchronize()
        return out

    def save_runtime_cache(self) -> None:
        """Persist TensorRT-RTX's JIT-compiled kernels beside the engine (best effort)."""
        save_runtime_cache_file(self._runtime_cache, self._cache_path)
