"""The Python API a serving process imports: `load(artifact)` -> `Generator.generate/stream`."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, overload

from kiln.errors import KilnError
from kiln.runtime import decode
from kiln.runtime.artifact import ArtifactInfo, inspect_artifact, source_dirs
from kiln.runtime.decode import Event
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.slots import SlotBackend
from kiln.runtime.speculate import Speculator
from kiln.runtime.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

Prompt = str | Sequence[int]


@dataclass(frozen=True)
class Completion:
    """One prompt's result: new token ids (stop token included), text, and why it ended."""

    index: int
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str


class Generator:
    """A loaded artifact: its slot backend, tokenizer (when it has one) and stop ids."""

    def __init__(
        self, backend: SlotBackend, info: ArtifactInfo, tokenizer: Tokenizer | None = None
    ) -> None:
        self.backend = backend
        self.info = info
        self.tokenizer = tokenizer
        # Optional decode-loop features (runtime/speculate.py, runtime/prefix_cache.py).
        self.speculator: Speculator | None = None
        self.prefix_cache: PrefixCache | None = None

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's BOS), or the ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KilnError(
                    f"{self.info.path} has no tokenizer files, so text prompts cannot be encoded; "
                    "pass token ids, or export from a model folder that has a tokenizer."
                )
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        use_cache: bool = True,
        **overrides: Any,
    ) -> Iterator[Event]:
        """Yield one Event per generated token per prompt, as soon as it is sampled.

        `overrides` are SamplingParams fields (max_new_tokens=..., temperature=..., ...).
        Joining one prompt's `Event.text` pieces gives its completion's text.
        """
        rows = self._sequences(prompts, params, overrides)
        for events in self._run(rows, use_cache):
            yield from events

    @overload
    def generate(
        self,
        prompts: Prompt,
        params: SamplingParams | None = None,
        *,
        use_cache: bool = True,
        **overrides: Any,
    ) -> Completion: ...

    @overload
    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        use_cache: bool = True,
        **overrides: Any,
    ) -> list[Completion]: ...

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        use_cache: bool = True,
        **overrides: Any,
    ) -> Completion | list[Completion]:
        """Generate to completion; a single prompt gives a Completion, a list gives a list."""
        rows = self._sequences(prompts, params, overrides)
        for _ in self._run(rows, use_cache):
            pass
        done = [
            Completion(
                s.index,
                s.prompt_ids,
                s.out_ids,
                s.text if self.tokenizer is not None else None,
                s.finish_reason or "length",
            )
            for s in rows
        ]
        return done if _batch(prompts)[1] else done[0]

    def _run(self, rows: list[decode.Sequence], use_cache: bool) -> Iterator[list[Event]]:
        return decode.generate(
            self.backend,
            rows,
            use_cache=use_cache,
            reprefill_at=self.info.reprefill_at,
            speculator=self.speculator,
            prefix_cache=self.prefix_cache,
        )

    def _sequences(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None,
        overrides: dict[str, Any],
    ) -> list[decode.Sequence]:
        base = replace(params or SamplingParams(), **_as_tuples(overrides))
        batch, _ = _batch(prompts)
        if not batch:
            raise KilnError("No prompts given; pass one prompt or a non-empty list of prompts.")
        rows = []
        for i, p in enumerate(batch):
            seed = None if base.seed is None else base.seed + i  # each row its own stream
            rows.append(
                decode.Sequence(
                    index=i,
                    prompt_ids=self.encode(p),
                    params=replace(base, seed=seed),
                    eos_ids=self.info.eos_ids,
                    tokenizer=self.tokenizer,
                )
            )
        return rows


def _batch(prompts: Prompt | Sequence[Prompt]) -> tuple[list[Prompt], bool]:
    """The prompts as a list; True when given as a list of prompts, not one string or id list."""
    if isinstance(prompts, str):
        return [prompts], False
    items = list(prompts)
    ids = [p for p in items if isinstance(p, int)]
    if len(ids) == len(items):  # one id list
        return [ids], False
    if ids:
        raise KilnError(
            f"Prompt list {items[:4]!r} mixes token ids with prompts; pass one list of ids or a "
            "list of prompts (strings or id lists)."
        )
    return [p for p in items if not isinstance(p, int)], True


def _as_tuples(overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(overrides)
    for key in ("stop", "stop_token_ids"):
        if key in out and out[key] is not None:
            v = out[key]
            out[key] = (v,) if isinstance(v, str | int) else tuple(v)
    return {k: v for k, v in out.items() if v is not None}


def load(
    artifact: Path | str,
    *,
    backend: str = "auto",
    device: str = "auto",
    threads: int = 0,
    io_binding: bool = True,
    profile_dir: Path | None = None,
    cuda_graph: bool = False,
    tokenizer: bool = True,
    slots: int = 4,
    spin: bool = True,
    last_only: bool = True,
) -> Generator:
    """Load an ONNX artifact (ONNX Runtime) or an engine folder (TensorRT) for generation.

    Every artifact runs over `slots` rows (runtime/README.md says why): a static-KV one
    natively, a concat-KV one through runtime/concat_slots.py (each slot its own cache).
    slots: sequences held at once; more prompts wait for a free slot. For a static artifact
    the buffers take slots x layers x 2 x Hkv x max_context x D elements.

    backend: "auto" (by what the folder holds), "onnxruntime" or "tensorrt".
    device, threads, profile_dir: ONNX Runtime options (profile_dir turns on ORT's per-op
    profiler); io_binding (concat artifacts) keeps the cache in OrtValues between steps; spin
    keeps ONNX Runtime's intra-op threads spinning between ops (faster on an idle host, much
    slower on a shared one).
    cuda_graph: TensorRT-RTX whole-graph capture for decode steps.
    tokenizer: False skips the tokenizer (token-id prompts only).
    last_only: a static ONNX graph computes logits at each row's last position only (cheaper
    prefill); False keeps every position, which speculative decoding's verify pass needs.
    """
    info = inspect_artifact(Path(artifact))
    if backend == "auto":
        backend = "tensorrt" if info.kind == "engine" else "onnxruntime"
    if backend == "onnxruntime":
        if info.kind != "onnx":
            raise KilnError(
                f"{info.path} holds TensorRT engines, not ONNX; use --backend tensorrt."
            )
        be = _ort_backend(
            info,
            slots=slots,
            device=device,
            threads=threads,
            io_binding=io_binding,
            profile_dir=profile_dir,
            spin=spin,
            last_only=last_only,
        )
    elif backend == "tensorrt":
        be = _trt_backend(info, slots=slots, cuda_graph=cuda_graph)
    else:
        raise KilnError(f"Unknown backend {backend!r}; choose auto, onnxruntime or tensorrt.")
    if be.max_context != info.max_context:
        log.warning(
            "graph slot length %d differs from the manifest's %d; using the graph's",
            be.max_context,
            info.max_context,
        )
    log.info("loaded %s with %s (%d x %d positions)", info.path, be.name, slots, be.max_context)
    return Generator(be, info, tokenizer_of(info) if tokenizer else None)


def _ort_backend(
    info: ArtifactInfo,
    *,
    slots: int,
    device: str,
    threads: int,
    io_binding: bool,
    profile_dir: Path | None,
    spin: bool,
    last_only: bool,
) -> SlotBackend:
    """OrtSlotBackend for a static graph; the concat adapter over OrtBackend otherwise."""
    if info.layout.has_slots:
        from kiln.runtime.ort_slots import OrtSlotBackend

        return OrtSlotBackend(
            info.onnx_path,
            slots=slots,
            device=device,
            threads=threads,
            profile_dir=profile_dir,
            spin=spin,
            last_only=last_only,
        )
    from kiln.runtime.concat_slots import ConcatSlotBackend
    from kiln.runtime.ort_backend import OrtBackend

    concat = OrtBackend(
        info.onnx_path,
        max_context=info.max_context,
        device=device,
        threads=threads,
        io_binding=io_binding,
        profile_dir=profile_dir,
        spin=spin,
    )
    return ConcatSlotBackend(concat, slots=slots)


def _trt_backend(info: ArtifactInfo, *, slots: int, cuda_graph: bool) -> SlotBackend:
    """TrtSlotBackend for a static engine; the concat adapter over TrtBackend otherwise."""
    if info.layout.has_slots:
        from kiln.runtime.trt_backend import slot_backend_from_engines

        return slot_backend_from_engines(info, slots=slots, cuda_graph=cuda_graph)
    from kiln.runtime.concat_slots import ConcatSlotBackend
    from kiln.runtime.trt_backend import backend_from_engines

    return ConcatSlotBackend(backend_from_engines(info, cuda_graph=cuda_graph), slots=slots)


def tokenizer_of(info: ArtifactInfo) -> Tokenizer | None:
    """The artifact's tokenizer (runtime/tokenizer.py); None when it carries no tokenizer files."""
    folders = [info.path, *info.engines]
    for engine in info.engines:
        folders += source_dirs(engine, info.manifest)
    return load_tokenizer(folders)
