"""Speed: measured on the CPU, estimated by a stated cost model for GPU profiles.

CPU: every runner (candidate artifact x runtime settings) is loaded once through kiln's
runtime (`kiln.runtime.load`), warmed up, then timed round-robin over the repeats (A 1, B 1,
..., A 2, ...) so all share the machine's noise, as bench/race.py does. One repeat generates
the workload: `concurrency` prompts of `prompt_tokens` seeded ids, exactly `output_tokens`
new tokens each. Reported: median tokens/s and its spread (min..max over repeats).

GPU (measured: false): a decode step streams every weight it multiplies once plus each row's
KV cache, so tokens/s ~ bandwidth x rows / (weight bytes + rows x KV bytes per row), with the
profile's memory bandwidth (models/gpus/*.toml memory_bandwidth_gbs) and the mean context of
the workload's decode. Compute, launch overheads and dequantization cost are ignored: it ranks
bytes, which is what bounds batch-1 decode.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.tune.recipe import Workload

log = logging.getLogger(__name__)

SEED = 0


@dataclass(frozen=True)
class Runner:
    """One timed configuration: an artifact with runtime settings."""

    key: str
    artifact: Path
    threads: int
    slots: int


def time_runners(
    runners: list[Runner], workload: Workload, repeats: int, *, backend: str = "onnxruntime"
) -> dict[str, Any]:
    """Interleaved timing of every runner; key -> samples, median, spread (tokens/s)."""
    from kiln.runtime import load

    rng = np.random.default_rng(SEED)
    gens = {}
    for r in runners:
        if backend == "tensorrt":
            gens[r.key] = load(r.artifact, backend=backend, tokenizer=False, slots=r.slots)
            continue
        gens[r.key] = load(
            r.artifact, backend=backend, device="cpu", tokenizer=False,
            threads=r.threads, slots=r.slots, spin=False,
        )  # fmt: skip
    vocab = next(iter(gens.values())).backend.vocab if gens else 0
    prompts = rng.integers(3, max(vocab, 4), (workload.concurrency, workload.prompt_tokens))
    batch = [p.tolist() for p in prompts]
    new = workload.output_tokens
    samples: dict[str, list[float]] = {r.key: [] for r in runners}

    def once(key: str) -> float:
        t0 = time.perf_counter()
        gens[key].generate(batch, max_new_tokens=new, min_new_tokens=new, ignore_eos=True)
        return len(batch) * new / (time.perf_counter() - t0)

    for key in gens:
        once(key)  # warm-up: first-run allocations and thread pools
    for rep in range(repeats):
        for key in gens:
            samples[key].append(once(key))
        log.info("timing: repeat %d/%d", rep + 1, repeats)
    return {key: summarize(s) for key, s in samples.items()}


def summarize(samples: list[float]) -> dict[str, Any]:
    """Median and spread of tokens/s samples."""
    a = np.asarray(samples)
    return {
        "tokens_per_s": float(np.median(a)),
        "min": float(a.min()),
        "max": float(a.max()),
        "samples": [round(float(x), 3) for x in a],
    }


def ratio_band(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float, float]:
    """Quartiles (25%, 50%, 75%) of a's tokens/s over b's, repeat by repeat.

    The runners were timed round-robin, so repeat i of both shared the machine's state: the
    per-repeat ratio cancels most of a loaded host's drift that the raw spreads carry.
    """
    r = np.asarray(a["samples"]) / np.asarray(b["samples"])
    q25, q50, q75 = np.percentile(r, [25, 50, 75])
    return float(q25), float(q50), float(q75)


def tied(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Within noise: the middle half of the per-repeat ratios a/b straddles 1."""
    if "samples" not in a or "samples" not in b:  # cost-model figures: exact ties only
        return bool(a["tokens_per_s"] == b["tokens_per_s"])
    lo, _, hi = ratio_band(a, b)
    return lo <= 1.0 <= hi


def weight_bytes(onnx_path: Path) -> dict[str, int]:
    """Bytes of the weights a decode step reads: every initializer but gathered embeddings.

    An embedding table read only by Gather costs one row per token; one also multiplied (a
    tied LM head) counts in full.
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    gathered, multiplied = set(), set()
    for n in proto.graph.node:
        if n.op_type == "Gather" and n.input:
            gathered.add(n.input[0])
        else:
            multiplied.update(n.input)
    total = read = 0
    for t in proto.graph.initializer:
        size = _tensor_bytes(t)
        total += size
        if not (t.name in gathered and t.name not in multiplied):
            read += size
    return {"weights": total, "read_per_step": read}


def _tensor_bytes(t: Any) -> int:
    import onnx

    count = int(np.prod(t.dims)) if t.dims else 1
    bits = {
        onnx.TensorProto.INT4: 4,
        onnx.TensorProto.UINT4: 4,
        onnx.TensorProto.INT8: 8,
        onnx.TensorProto.UINT8: 8,
        onnx.TensorProto.FLOAT8E4M3FN: 8,
        onnx.TensorProto.FLOAT16: 16,
        onnx.TensorProto.BFLOAT16: 16,
        onnx.TensorProto.FLOAT: 32,
        onnx.TensorProto.INT32: 32,
        onnx.TensorProto.INT64: 64,
        onnx.TensorProto.DOUBLE: 64,
    }.get(t.data_type, 32)
    return (count * bits + 7) // 8


def decode_cost(
    read_bytes: int, kv_bytes_per_token: int, workload: Workload, slots: int, bandwidth_gbs: float
) -> dict[str, Any]:
    """Estimated decode tokens/s from bytes streamed per step (the module docstring's model)."""
    rows = min(slots, workload.concurrency)
    context = workload.prompt_tokens + workload.output_tokens / 2
    step_bytes = read_bytes + rows * kv_bytes_per_token * context
    step_s = step_bytes / (bandwidth_gbs * 1e9)
    return {
        "tokens_per_s": rows / step_s,
        "step_bytes": int(step_bytes),
        "weights_read_bytes": read_bytes,
        "kv_bytes_per_token": kv_bytes_per_token,
        "rows": rows,
        "mean_context": context,
        "bandwidth_gbs": bandwidth_gbs,
        "measured": False,
        "model": "tokens/s = rows x bandwidth / (weight bytes + rows x KV bytes/token x context)",
    }
