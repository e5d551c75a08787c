"""Generation over a static-KV artifact: prompts mapped to slots, a freed slot refilled at once.

The loop is continuous batching in its simplest form: every step feeds each busy slot its next
token (or, for a slot that just took a waiting prompt, the whole prompt), samples one token per
fed slot with `decode.Sequence`, and hands a finished sequence's slot to the next waiting prompt
in the same step the others decode. Slots are independent rows of the graph, so a sequence's
tokens do not depend on what shares the step with it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from kiln.errors import KilnError
from kiln.runtime import decode
from kiln.runtime.artifact import inspect_artifact
from kiln.runtime.decode import Event
from kiln.runtime.generator import Generator, tokenizer_of
from kiln.runtime.slots import SlotBackend, SlotFeed

log = logging.getLogger(__name__)


class SlotGenerator(Generator):
    """A loaded static-KV artifact; `.generate`/`.stream` as `Generator`, run over slots."""

    backend: SlotBackend  # type: ignore[assignment]

    def _run(self, rows: list[decode.Sequence], use_cache: bool) -> Iterator[list[Event]]:
        return generate_slots(
            self.backend, rows, use_cache=use_cache, reprefill_at=self.info.reprefill_at
        )


def generate_slots(
    backend: SlotBackend,
    rows: list[decode.Sequence],
    *,
    use_cache: bool = True,
    reprefill_at: int | None = None,
) -> Iterator[list[Event]]:
    """Run every row to completion over the backend's slots; yield each step's events.

    use_cache=False refeeds each sequence whole at every step (restart): the reference path.
    reprefill_at: position at which a sequence's cache is rebuilt from all its tokens once
    (longrope's switch to its long factors, as transformers' Phi-3 generate() does).
    """
    for seq in rows:
        decode.check_fits(seq, backend.max_context)
    waiting = deque(rows)
    free = list(range(backend.slots))
    busy: dict[int, decode.Sequence] = {}
    feeds: list[SlotFeed] = []
    steps = 0
    while True:
        while waiting and free:  # lowest slots first: the fed range stays short
            slot = free.pop(free.index(min(free)))
            busy[slot] = waiting.popleft()
            feeds.append(SlotFeed(slot, busy[slot].prompt_ids, restart=True))
        logits_NV = backend.step(feeds)
        steps += 1
        events, next_feeds = [], []
        for feed, logits_V in zip(feeds, logits_NV, strict=True):
            seq = busy[feed.slot]
            tok = seq.choose(logits_V)
            piece = seq.accept(tok, backend.max_context - len(seq.prompt_ids))
            events.append(Event(seq.index, tok, piece, seq.finish_reason))
            if seq.done:
                del busy[feed.slot]
                backend.release(feed.slot)
                free.append(feed.slot)
            else:
                next_feeds.append(_next_feed(backend, feed.slot, seq, use_cache, reprefill_at))
        yield events
        if not busy and not waiting:
            return
        feeds = next_feeds
        if steps % 32 == 0:
            log.debug("step %d: %d slots busy, %d waiting", steps, len(busy), len(waiting))


def _next_feed(
    backend: SlotBackend,
    slot: int,
    seq: decode.Sequence,
    use_cache: bool,
    reprefill_at: int | None,
) -> SlotFeed:
    """The slot's last sampled token, or its whole sequence when the cache is rebuilt."""
    if not use_cache or backend.length(slot) == reprefill_at:
        return SlotFeed(slot, [*seq.prompt_ids, *seq.out_ids], restart=True)
    return SlotFeed(slot, [seq.out_ids[-1]])


def load_slots(
    artifact: Path | str,
    *,
    slots: int = 4,
    backend: str = "auto",
    device: str = "auto",
    threads: int = 0,
    profile_dir: Path | None = None,
    cuda_graph: bool = False,
    tokenizer: bool = True,
    spin: bool = True,
) -> SlotGenerator:
    """Load a static-KV artifact (`kiln export --kv static`) for slot-based generation.

    slots: rows held at once (the graph's batch axis is dynamic; the buffers take
    slots x layers x 2 x Hkv x max_context x D elements). backend: "auto" picks TensorRT for an
    engine folder and ONNX Runtime for ONNX. device, threads, profile_dir, spin: ONNX Runtime
    options; cuda_graph: TensorRT whole-graph capture of decode calls.
    """
    info = inspect_artifact(Path(artifact))
    if info.kv_layout != "static":
        raise KilnError(
            f"{info.path} has the {info.kv_layout} KV layout; slots need a static one. Use "
            "kiln.runtime.load for it, or re-export with `kiln export MODEL --kv static "
            "--max-context N`."
        )
    if backend == "auto":
        backend = "tensorrt" if info.kind == "engine" else "onnxruntime"
    be: SlotBackend
    if backend == "onnxruntime":
        if info.kind != "onnx":
            raise KilnError(f"{info.path} holds TensorRT engines, not ONNX; use backend tensorrt.")
        from kiln.runtime.ort_slots import OrtSlotBackend

        be = OrtSlotBackend(
            info.onnx_path,
            slots=slots,
            device=device,
            threads=threads,
            profile_dir=profile_dir,
            spin=spin,
        )
    elif backend == "tensorrt":
        from kiln.runtime.trt_backend import slot_backend_from_engines

        be = slot_backend_from_engines(info, slots=slots, cuda_graph=cuda_graph)
    else:
        raise KilnError(f"Unknown backend {backend!r}; choose auto, onnxruntime or tensorrt.")
    if be.max_context != info.max_context:
        log.warning(
            "graph slot length %d differs from the manifest's %d; using the graph's",
            be.max_context,
            info.max_context,
        )
    log.info("loaded %s with %s (%d x %d positions)", info.path, be.name, slots, be.max_context)
    return SlotGenerator(be, info, tokenizer_of(info) if tokenizer else None)  # type: ignore[arg-type]
