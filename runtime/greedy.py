"""Greedy decoding of one prompt over an exported ONNX artifact (batch 1).

Kept for the demo and the export tests; it is a thin wrapper over the runtime's decode loop.
"""

from __future__ import annotations

from pathlib import Path


def greedy_from_onnx(
    artifact: Path, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
    """Greedy-decode up to `max_new_tokens` after `prompt_ids`; stop at `eos_id` (not returned)."""
    from kiln.runtime import load

    gen = load(artifact, backend="onnxruntime", device="cpu")
    done = gen.generate(
        list(prompt_ids),
        max_new_tokens=max_new_tokens,
        ignore_eos=True,
        stop_token_ids=() if eos_id is None else (eos_id,),
    )
    ids = list(done.token_ids)
    return ids[:-1] if done.finish_reason == "stop" else ids
