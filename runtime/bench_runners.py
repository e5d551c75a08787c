"""One benchmark runner per child process, so each one's peak memory is its own.

Runners: `kiln` (kiln.runtime's loop on ONNX Runtime CPU over the export artifact), `hf`
(transformers `generate()` in PyTorch eager), `genai` (onnxruntime-genai over its own model
builder's ONNX), and `profile` (kiln's loop with ONNX Runtime's per-op profiler on). All get the
same input ids and produce exactly the same number of tokens (min = max new tokens, EOS off).

usage: python -m kiln.runtime.bench_runners RUNNER MODEL_DIR IDS.npy OUT.json [--new N] ...
Timing: TTFT = one generate() call that makes 1 token; decode tok/s = batch x (N - 1) /
(time of a call that makes N tokens - TTFT at the same batch). Best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

Run = Callable[[np.ndarray, int], list[int]]  # (ids_BS, new tokens) -> row 0's new tokens


def _kiln(artifact: Path, **kw: Any) -> Run:
    from kiln.runtime import load

    gen = load(artifact, backend="onnxruntime", device="cpu", tokenizer=False, **kw)

    def run(ids: np.ndarray, new: int) -> list[int]:
        out = gen.generate(ids.tolist(), max_new_tokens=new, min_new_tokens=new, ignore_eos=True)
        return out[0].token_ids  # type: ignore[index]

    run.gen = gen  # type: ignore[attr-defined]
    return run


def _hf(model_dir: Path) -> Run:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(ids: np.ndarray, new: int) -> list[int]:
        with torch.inference_mode():
            t = torch.from_numpy(ids)
            out = model.generate(
                input_ids=t,
                attention_mask=torch.ones_like(t),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, ids.shape[1] :].tolist()

    return run


def _genai(model_dir: Path) -> Run:
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))

    def run(ids: np.ndarray, new: int) -> list[int]:
        b, s = ids.shape
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=s + new, min_length=s + new, do_sample=False, batch_size=b
        )
        gen = og.Generator(model, params)
        gen.append_tokens(ids.astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in gen.get_sequence(0)[s:]]

    return run


def _timed(run: Run, ids: np.ndarray, new: int) -> tuple[float, list[int]]:
    t0 = time.perf_counter()
    toks = run(ids, new)
    return time.perf_counter() - t0, toks


def measure(run: Run, ids_BS: np.ndarray, new: int, batches: list[int], repeats: int) -> dict:
    """TTFT and decode tok/s per batch size; the tokens of row 0 at batch 1."""
    run(ids_BS[:1, :16], 4)  # warm up: allocations, thread pools, kernels
    out: dict[str, Any] = {"batches": {}}
    for b in batches:
        ids = ids_BS[:b]
        ttft = min(_timed(run, ids, 1)[0] for _ in range(3))
        full, toks = min((_timed(run, ids, new) for _ in range(repeats)), key=lambda r: r[0])
        if b == 1:
            out["tokens"] = toks
        assert len(toks) == new, f"runner made {len(toks)} tokens, not {new}"
        out["batches"][str(b)] = {
            "ttft_s": ttft,
            "total_s": full,
            "decode_tok_s": b * (new - 1) / max(full - ttft, 1e-9),
        }
    return out


def profile_kiln(artifact: Path, ids_BS: np.ndarray, new: int, work: Path) -> dict:
    """Where kiln's decode time goes: ORT per-op totals, graph vs loop time, KV bytes copied."""
    work.mkdir(parents=True, exist_ok=True)
    run = _kiln(artifact, profile_dir=work)
    gen = run.gen  # type: ignore[attr-defined]
    ids = ids_BS[:1]
    wall, _ = _timed(run, ids, new)
    trace = json.loads(Path(gen.backend.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs = []
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"].get("op_name", "?")] += ev["dur"]
        elif ev.get("cat") == "Session" and ev["name"] == "model_run":
            runs.append(ev["dur"])
    node_us = sum(by_op.values())
    m = gen.info.manifest["config"]
    # concat KV: each decode step writes present = past + 1 for every layer's K and V
    itemsize = 4 if gen.info.manifest["exporter"]["precision"] == "fp32" else 2
    prompt = ids.shape[1]
    kv_row = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * itemsize
    copied = [kv_row * (prompt + i) for i in range(1, new)]
    decode_runs = runs[1:]  # the first run is the prefill
    return {
        "wall_s": wall,
        "graph_s": sum(runs) / 1e6,
        "prefill_graph_s": runs[0] / 1e6 if runs else 0.0,
        "decode_graph_ms_per_step": float(np.mean(decode_runs)) / 1e3 if decode_runs else 0.0,
        "loop_overhead_s": wall - sum(runs) / 1e6,
        "ops": sorted(
            ({"op": k, "s": v / 1e6, "share": v / node_us} for k, v in by_op.items()),
            key=lambda r: -r["s"],
        ),
        "kv_bytes_copied_per_step_mean": float(np.mean(copied)),
        "kv_bytes_copied_per_step_last": copied[-1],
    }


def peak_rss_mib() -> float:
    """This process image's peak resident memory (VmHWM).

    Not getrusage's ru_maxrss: Linux keeps that across fork+exec, so a child would report its
    parent's peak if the parent was larger.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    """Run one runner and write its figures (plus peak RSS) as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runner", choices=["kiln", "hf", "genai", "profile"])
    p.add_argument("model", type=Path, help="artifact (kiln), HF folder (hf), genai folder")
    p.add_argument("ids", type=Path, help=".npy of input ids [max batch, prompt]")
    p.add_argument("out", type=Path, help="JSON result")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)
    ids = np.load(args.ids)
    t0 = time.perf_counter()
    if args.runner == "profile":
        result = profile_kiln(args.model, ids, args.new, args.out.parent / "ort-profile")
    else:
        make = {"kiln": _kiln, "hf": _hf, "genai": _genai}[args.runner]
        run = make(args.model)
        load_s = time.perf_counter() - t0
        batches = [int(b) for b in args.batches.split(",")]
        result = {"load_s": load_s, **measure(run, ids, args.new, batches, args.repeats)}
    result["peak_rss_mib"] = peak_rss_mib()
    args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
