"""One benchmark runner per child process, so each one's peak memory is its own.

Runners: `kiln` (kiln.runtime's loop on ONNX Runtime CPU over an artifact: a concat one runs
the batch loop, a static one the slot loop with one slot per row), `hf` (transformers
`generate()` in PyTorch eager), `genai` (onnxruntime-genai over its own model builder's ONNX),
`llamacpp` (llama.cpp through llama-cpp-python over a GGUF, bench/llamacpp_runner.py), and
`profile` (kiln's loop with ONNX Runtime's per-op profiler on). All get the same input ids
and produce exactly the same number of tokens (min = max new tokens, EOS off), with the same
intra-op thread count (`--threads`) and each runner's documented best CPU settings, which the
worker reports back so the table can state them.

A timed runner is a worker: it loads, warms up and prints a `@race ` JSON line with its
settings, then answers each `rep` line on stdin with one repeat's figures (a `@race ` line) and
`quit` with its peak memory. bench/race.py drives all workers round-robin (A rep 1, B rep 1,
..., A rep 2, ...) so they share the machine's noise.

usage: python -m bench.race_runners RUNNER MODEL_DIR IDS.npy [--new N] [--threads T] ...
Timing, per repeat and batch size, from one streamed call that makes N tokens per row: TTFT =
from the call to the first token of the batch (each runner's stream: kiln.runtime's
Generator.stream, a transformers streamer, genai's generate_next_token loop, llama.cpp's decode
loop); decode tok/s = batch x (N - 1) / (time from that first token to the last).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# (ids_BS, new tokens) -> (row 0's new tokens, perf_counter() when the first token came out)
Run = Callable[[np.ndarray, int], tuple[list[int], float]]
MARK = "@race "  # prefix of the worker's protocol lines on stdout (libraries may print too)


def _kiln(artifact: Path, threads: int, spin: bool, slots: int, **kw: Any) -> tuple[Run, dict]:
    from kiln.runtime import load

    gen = load(artifact, backend="onnxruntime", device="cpu", tokenizer=False, threads=threads,
               spin=spin, slots=slots, **kw)  # fmt: skip

    def run(ids: np.ndarray, new: int) -> tuple[list[int], float]:
        first, toks = 0.0, []
        stream = gen.stream(ids.tolist(), max_new_tokens=new, min_new_tokens=new, ignore_eos=True)
        for event in stream:  # one event per row per step, as soon as it is sampled
            first = first or time.perf_counter()
            if event.index == 0:
                toks.append(event.token_id)
        return toks, first

    run.gen = gen  # type: ignore[attr-defined]
    # runtime/generator.py load(threads=, spin=) -> kiln/graph_io.py ort_session
    settings = {
        "intra_op_num_threads": threads,
        "session.intra_op.allow_spinning": "1" if spin else "0",
        "provider": "CPUExecutionProvider (no provider options)",
        "batch": f"{slots} slots, one row per sequence ({gen.backend.name})",
    }
    return run, settings


def _hf(model_dir: Path, threads: int, spin: bool) -> tuple[Run, dict]:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):  # type: ignore[misc]
        """generate() puts the prompt, then each step's tokens: stamp the first step."""

        def __init__(self) -> None:
            self.puts, self.at = 0, 0.0

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    # transformers eager runs ATen's intra-op (OpenMP) pool: torch.set_num_threads sizes it.
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run(ids: np.ndarray, new: int) -> tuple[list[int], float]:
        first = FirstToken()
        with torch.inference_mode():
            t = torch.from_numpy(ids)
            out = model.generate(
                input_ids=t,
                attention_mask=torch.ones_like(t),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=0,
                streamer=first,
            )
        return out[0, ids.shape[1] :].tolist(), first.at

    settings = {
        "torch.set_num_threads": torch.get_num_threads(),
        "spin": f"OpenMP default wait policy (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})",
        "attention": str(model.config._attn_implementation),
        "batch": "generate() over [B, S] ids, dynamic KV cache",
    }
    return run, settings


def _genai(model_dir: Path, threads: int, spin: bool) -> tuple[Run, dict]:
    import onnxruntime_genai as og

    # onnxruntime-genai reads session options from genai_config.json's
    # model.decoder.session_options (src/config.cpp SessionOptions_Element): intra_op_num_threads
    # is a SessionOptions field, any other key an ORT config entry (AddConfigEntry). Without it,
    # src/models/model.cpp sets intra-op threads to half the hardware threads (1 on 2 cores).
    # Config.overlay applies the same JSON on top of the folder's genai_config.json.
    session = {
        "intra_op_num_threads": threads,
        "session.intra_op.allow_spinning": "1" if spin else "0",
    }
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": session}}}))
    model = og.Model(config)
    saved = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    providers = saved.get("session_options", {}).get("provider_options", [])

    def run(ids: np.ndarray, new: int) -> tuple[list[int], float]:
        b, s = ids.shape
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=s + new, min_length=s + new, do_sample=False, batch_size=b
        )
        gen = og.Generator(model, params)
        gen.append_tokens(ids.astype(np.int32))
        gen.generate_next_token()
        first = time.perf_counter()
        while not gen.is_done():
            gen.generate_next_token()
        return [int(t) for t in gen.get_sequence(0)[s:]], first

    settings = {
        **session,
        "provider": f"CPU (genai_config provider_options: {providers or 'none'})",
        "batch": "GeneratorParams batch_size=B, past_present_share_buffer KV of max_length",
    }
    return run, settings


def _llamacpp(gguf: Path, threads: int, spin: bool, max_batch: int, max_len: int) -> tuple:
    from bench.llamacpp_runner import LlamaCppRun

    run = LlamaCppRun(gguf, threads, max_batch, max_len)
    settings = {
        **run.settings,
        "spin": (
            f"ggml barriers spin within a step; between steps OpenMP default wait policy "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})"
        ),
        "batch": f"one context, n_seq_max={max_batch}, one llama_batch per step",
    }
    return run, settings


def _timed(run: Run, ids: np.ndarray, new: int) -> tuple[float, float, list[int]]:
    """(seconds to the first token, seconds in all, row 0's tokens) of one streamed call."""
    t0 = time.perf_counter()
    toks, first = run(ids, new)
    end = time.perf_counter()
    assert t0 < first <= end, "the runner did not stamp its first token"
    return first - t0, end - t0, toks


def one_repeat(run: Run, ids_BS: np.ndarray, new: int, batches: list[int]) -> dict:
    """One repeat: TTFT and decode tok/s per batch size, and the tokens of row 0 at batch 1."""
    out: dict[str, Any] = {"batches": {}}
    for b in batches:
        ttft, full, toks = _timed(run, ids_BS[:b], new)
        if b == 1:
            out["tokens"] = toks
        assert len(toks) == new, f"runner made {len(toks)} tokens, not {new}"
        out["batches"][str(b)] = {
            "ttft_s": ttft,
            "total_s": full,
            "decode_tok_s": b * (new - 1) / max(full - ttft, 1e-9),
        }
    return out


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(run: Run, settings: dict, ids: np.ndarray, args: argparse.Namespace, t0: float) -> None:
    """The worker loop: ready line, then one repeat per `rep` line until `quit`."""
    run(ids[:1, :16], 4)  # warm up: allocations, thread pools, kernels
    run(ids[: max(args.batches), :16], 4)
    _say({"ready": True, "load_s": time.perf_counter() - t0, "settings": settings})
    for line in sys.stdin:
        if line.strip() == "rep":
            _say(one_repeat(run, ids, args.new, args.batches))
        elif line.strip() == "quit":
            break
    _say({"peak_rss_mib": peak_rss_mib()})


def _trace_figures(trace_path: str) -> dict[str, Any]:
    """ORT profiler trace -> per-op totals and graph time per run (the first run is prefill)."""
    trace = json.loads(Path(trace_path).read_text())
    by_op: dict[str, float] = defaultdict(float)
    runs = []
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"].get("op_name", "?")] += ev["dur"]
        elif ev.get("cat") == "Session" and ev["name"] == "model_run":
            runs.append(ev["dur"])
    node_us = sum(by_op.values())
    decode_runs = runs[1:]
    return {
        "graph_s": sum(runs) / 1e6,
        "prefill_graph_s": runs[0] / 1e6 if runs else 0.0,
        "decode_graph_ms_per_step": float(np.mean(decode_runs)) / 1e3 if decode_runs else 0.0,
        "ops": sorted(
            ({"op": k, "s": v / 1e6, "share": v / node_us} for k, v in by_op.items()),
            key=lambda r: -r["s"],
        ),
    }


@contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """Send file descriptor 2 (where ONNX Runtime's C++ logger writes) to `path`."""
    saved = os.dup(2)
    with path.open("w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def profile_kiln(
    artifact: Path, ids_BS: np.ndarray, new: int, work: Path, threads: int, spin: bool
) -> dict:
    """Where kiln's decode time goes: ORT per-op totals, graph vs loop time, KV bytes copied."""
    from kiln.runtime.artifact import inspect_artifact

    work.mkdir(parents=True, exist_ok=True)
    if inspect_artifact(artifact).layout.has_slots:
        return _profile_static(artifact, ids_BS[:1], new, work, threads, spin)
    run, _ = _kiln(artifact, threads, spin, slots=1, profile_dir=work)
    gen = run.gen  # type: ignore[attr-defined]
    ids = ids_BS[:1]
    wall = _timed(run, ids, new)[1]
    concat = gen.backend.concat  # the concat Backend under the runtime's slot adapter
    figures = _trace_figures(concat.end_profiling())
    m = gen.info.manifest.config
    # concat KV: each decode step writes present = past + 1 for every layer's K and V
    itemsize = np.dtype(concat.kv_dtype).itemsize
    kv_row = 2 * m["layers"] * m["kv_heads"] * m["head_dim"] * itemsize
    copied = [kv_row * (ids.shape[1] + i) for i in range(1, new)]
    return {
        "wall_s": wall,
        **figures,
        "loop_overhead_s": wall - figures["graph_s"],
        "kv_bytes_copied_per_step_mean": float(np.mean(copied)),
        "kv_bytes_copied_per_step_last": copied[-1],
        "kv_copy_measure": "concat present = past + new rows, every layer (computed)",
    }


def _profile_static(
    artifact: Path, ids: np.ndarray, new: int, work: Path, threads: int, spin: bool
) -> dict:
    """The slot loop profiled, with ORT at WARNING so TensorScatter reports any cache copy.

    Evidence of the in-place update, per step: the present OrtValues ORT returns sit at the
    K/V buffers' addresses, and TensorScatter's "in-place optimization not activated, copying
    past_cache to present_cache (N bytes)" warning (its only copy path) never appears.
    """
    from kiln.runtime.artifact import inspect_artifact
    from kiln.runtime.generator import Generator
    from kiln.runtime.ort_slots import OrtSlotBackend, scatter_copy_bytes

    info = inspect_artifact(artifact)
    backend = OrtSlotBackend(info.onnx_path, slots=1, profile_dir=work, log_severity=1,
                             threads=threads, spin=spin)  # fmt: skip
    gen = Generator(backend, info)
    steps, moved = 0, 0
    step = backend.step

    def checked_step(feeds: Any) -> np.ndarray:
        nonlocal steps, moved
        out = step(feeds)
        steps += 1
        moved += backend.present_ptrs() != backend.buffer_ptrs()
        return out

    backend.step = checked_step  # type: ignore[method-assign]
    log_path = work / "ort-warnings.log"
    with _stderr_to(log_path):
        t0 = time.perf_counter()
        gen.generate(ids.tolist(), max_new_tokens=new, min_new_tokens=new, ignore_eos=True)
        wall = time.perf_counter() - t0
    figures = _trace_figures(backend.end_profiling())
    ops = {o["op"] for o in figures["ops"]}
    same = f"present address == past address in {steps - int(moved)}/{steps} steps"
    if "TensorScatter" in ops:
        copied = scatter_copy_bytes(log_path.read_text())
        how = f"ORT TensorScatter copy log over {steps} steps; {same}"
    else:
        # GroupQueryAttention shares past/present exactly when their addresses are equal
        # (contrib_ops/cpu/bert/group_query_attention.cc: past_present_share_buffer); a
        # non-shared step copies the whole past into present.
        copied = int(moved) * backend.kv_bytes
        how = f"GroupQueryAttention shares the buffer iff same address: {same}"
    return {
        "wall_s": wall,
        **figures,
        "loop_overhead_s": wall - figures["graph_s"],
        "steps": steps,
        "steps_with_present_not_at_past": int(moved),
        "kv_bytes_copied_per_step_mean": copied / max(steps, 1),
        "kv_bytes_copied_per_step_last": None,
        "kv_copy_measure": how,
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
    """Serve one runner (see the module docstring), or write kiln's profile as JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runner", choices=["kiln", "hf", "genai", "llamacpp", "profile"])
    p.add_argument("model", type=Path, help="artifact (kiln), HF folder, genai folder, GGUF")
    p.add_argument("ids", type=Path, help=".npy of input ids [max batch, prompt]")
    p.add_argument("--out", type=Path, help="profile: the JSON result")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--spin", choices=["on", "off"], default="on")
    args = p.parse_args(argv)
    ids = np.load(args.ids)
    t0 = time.perf_counter()
    if args.runner == "profile":
        work = args.out.parent / "ort-profile"
        result = profile_kiln(args.model, ids, args.new, work, args.threads, args.spin == "on")
        result["peak_rss_mib"] = peak_rss_mib()
        args.out.write_text(json.dumps(result, indent=2))
        return 0
    args.batches = [int(b) for b in args.batches.split(",")]
    spin = args.spin == "on"
    biggest = max(args.batches)
    if args.runner == "kiln":  # a static artifact gets one slot per row of the largest batch
        run, settings = _kiln(args.model, args.threads, spin, slots=biggest)
    elif args.runner == "llamacpp":
        run, settings = _llamacpp(args.model, args.threads, spin, biggest, ids.shape[1] + args.new)
    else:
        run, settings = {"hf": _hf, "genai": _genai}[args.runner](args.model, args.threads, spin)
    serve(run, settings, ids, args, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
