"""A minimal greedy decode loop over an exported ONNX artifact, with its KV cache fed back.

It proves an export end to end (the demo and the export tests use it); the full runtime with
batching, sampling and streaming is built on the same artifact contract.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kiln.export.check import ort_session
from kiln.export.wrapper import input_names
from kiln.manifest import read_manifest


def greedy_from_onnx(
    artifact: Path, prompt_ids: list[int], *, max_new_tokens: int, eos_id: int | None = None
) -> list[int]:
    """Greedy-decode up to `max_new_tokens` after `prompt_ids` (batch 1); stop at `eos_id`."""
    manifest = read_manifest(Path(artifact), "export.json", made_by="kiln export")
    cfg = manifest["config"]
    layers, kv_heads, head_dim = cfg["layers"], cfg["kv_heads"], cfg["head_dim"]
    past_dtype = np.float16 if manifest["exporter"]["precision"] == "fp16" else np.float32
    sess = ort_session(Path(artifact) / "model.onnx")
    names = input_names(layers)
    past = [np.zeros((1, kv_heads, 0, head_dim), past_dtype)] * (2 * layers)
    ids = np.array([prompt_ids], dtype=np.int64)
    done, out = 0, []
    for _ in range(max_new_tokens):
        total = done + ids.shape[1]
        mask = np.ones((1, total), np.int64)
        pos = np.arange(done, total, dtype=np.int64)[None, :]
        logits, *past = sess.run(None, dict(zip(names, [ids, mask, pos, *past], strict=True)))
        nxt = int(np.argmax(logits[0, -1]))
        done = total
        if nxt == eos_id:
            break
        out.append(nxt)
        ids = np.array([[nxt]], dtype=np.int64)
    return out
