"""`make bench`: the race of kiln against transformers, onnxruntime-genai and llama.cpp on CPU.

All on the same machine at the same intra-op thread count.

One run, same models and input ids for every runner, each runner in its own child process
(bench/race_runners.py) so peak memory is its own, every runner producing exactly `--new`
tokens (min = max new tokens). Runners: kiln concat fp32 (plain export and its ONNX Runtime
target), kiln static fp32, int8 and int4 (the onnxruntime target of `kiln optimize`),
transformers eager fp32, onnxruntime-genai fp32, int8 and int4 (its own model builder), and
llama.cpp F32, Q8_0 and Q4_0 (llama.cpp built with cmake by `make bench-deps`, driven through
the llama-cpp-python bindings, outside CI; skipped with the reason when it is not built).
Models: a SmolLM-135M-shaped Llama and a GPT-2-small-shaped model, seeded random weights.

Fairness: every runner gets `--threads` intra-op threads (default: the cores this process may
use) and its documented best CPU settings (bench/race_runners.py says which and where from;
the table prints them). Spinning (`--spin`) is ONNX Runtime's allow_spinning for kiln and
genai alike. The runners are loaded once and then run interleaved, round-robin over
`--repeats` (A rep 1, B rep 1, ..., A rep 2, ...), so all share the machine's noise; every
figure is the median over repeats with its spread, and every ratio comes from this one run.

Reports, from one streamed call per batch size and repeat, time to first token for a
`--prompt`-token prompt and decode tokens/s from that first token to the last, at batch 1 and 4,
peak RSS, ratios to PyTorch eager and to onnxruntime-genai at the same precision, each
runner's batch-1 decode speed as a share of the weight-streaming roofline (weight bytes per
decode step at the runner's precision against this machine's matrix-vector bandwidth,
measured in the same run), the target ratios (bench/race_report.py BARS), the load average at
start and end, and profiles of kiln's loops. Writes bench.json and bench.png into --out.

usage: python -m bench.race [--out out/bench] [--models smollm,gpt2] [--runners ...]
       [--threads 2] [--spin on] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.race_report import RUNNERS
from kiln.log import setup_logging
from kiln.models.shapes import SMOLLM_135M as SHAPES_SMOLLM

log = logging.getLogger("kiln.bench.race")

SMOLLM_135M = {**SHAPES_SMOLLM, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
PROFILED = ("kiln", "kiln-ort", "kiln-static", "kiln-static-int4")


def make_model(name: str, folder: Path, seed: int = 0) -> Path:
    """Save the named bench model with seeded random weights, plus a tokenizer for genai."""
    if not (folder / "config.json").is_file():
        import torch
        import transformers as T

        torch.manual_seed(seed)
        cfg = (
            T.LlamaConfig(**SMOLLM_135M)
            if name == "smollm"
            else T.GPT2Config(**GPT2_SMALL, bos_token_id=50256, eos_token_id=50256)
        )
        T.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    # onnxruntime-genai's builder saves a tokenizer next to its model and fails without one;
    # the runners feed token ids, so any tokenizer will do: use the bundled model's.
    from kiln.models.zen import ZEN_DIR

    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(ZEN_DIR / f, folder / f)
    return folder


def weight_bytes_per_step(folder: Path) -> tuple[int, int]:
    """(fp32 bytes of every matrix a batch-1 decode step reads, parameter count).

    Embedding tables are gathered (one row per token), so they count only as the LM head,
    which reads vocab x hidden once per step whether or not it is tied.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = dict(model.named_parameters())
    n = sum(p.numel() for p in params.values())
    read = sum(p.numel() for p in params.values() if p.dim() == 2 and id(p) not in embeds)
    head = model.get_output_embeddings().weight
    read += head.numel() if id(head) in embeds else 0
    return 4 * read, n


def matvec_bandwidth_gb_s(mib: int = 512, repeats: int = 8) -> float:
    """Best-of bandwidth of an fp32 matrix-vector product over a matrix far larger than cache."""
    cols = 4096
    w = np.random.default_rng(0).standard_normal((mib * 2**20 // (4 * cols), cols), np.float32)
    x = np.ones(cols, np.float32)
    w @ x  # warm up threads and pages
    best = min(_time(lambda: w @ x) for _ in range(repeats))
    return w.nbytes / best / 1e9


def _time(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_genai(hf_dir: Path, out: Path, precision: str) -> tuple[Path | None, str]:
    """onnxruntime-genai's own CPU model at `precision` (its builder), or None and the reason."""
    if (out / "genai_config.json").is_file():
        return out, "ok"
    cache = str(out.parent / "genai-cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(out), "-p", precision, "-e", "cpu", "-c", cache]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
        last = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:]
        why = last[0].replace(str(hf_dir), arch) if last else f"exit {proc.returncode}"
        return None, f"onnxruntime-genai's model builder refused {arch} ({why})"
    return out, "ok"


def static_int4(hf: Path, work: Path, max_context: int, label: str) -> tuple[Path, Path]:
    """(fp32 static export, its int4 ONNX Runtime optimize) under `work`, reused when made."""
    from kiln.export import export_model

    static = work / "onnx-static"
    if not (static / "export.json").is_file():
        export_model(hf, static, precision="fp32", kv="static", max_context=max_context)
    int4, why = ort_target(static, work / "ort-int4", "int4")
    if int4 is None:
        raise SystemExit(f"--model {label}: {why}")
    return static, int4


def ort_target(src: Path, out: Path, precision: str) -> tuple[Path | None, str]:
    """`kiln optimize --target onnxruntime` of an export (concat or static), or None and why.

    int4 runs with allow_drift: on random weights int4 drifts past its parity budget by
    construction (nothing to preserve), and the race measures speed; the drift is logged and
    recorded in optimize.json.
    """
    from kiln import optimize
    from kiln.errors import KilnError

    if "onnxruntime" not in getattr(optimize, "TARGETS", ()):
        return None, "this kiln's optimize stage has no onnxruntime target yet"
    try:
        done = optimize.optimize_model(src, out, target="onnxruntime", precision=precision,
                                       allow_drift=precision != "fp32")  # fmt: skip
    except KilnError as e:
        return None, f"kiln optimize --target onnxruntime -p {precision} failed: {e}"
    return done, "ok"


def prepare(name: str, work: Path, args: argparse.Namespace) -> dict[str, tuple[Path | None, str]]:
    """Each selected runner's model folder or file (or None) and a note saying what it is."""
    from bench import llamacpp_runner
    from kiln.export import export_model

    hf_dir = work / "hf"
    want = set(args.runners)
    got: dict[str, tuple[Path | None, str]] = {"hf": (hf_dir, "HF folder")}
    if want & {"kiln", "kiln-ort"}:
        concat = export_model(hf_dir, work / "onnx", precision="fp32")
        got["kiln"] = (concat, "export concat")
        if "kiln-ort" in want:
            opt, why = ort_target(concat, work / "ort-concat-fp32", "fp32")
            got["kiln-ort"] = (opt, "concat, optimize -t onnxruntime -p fp32" if opt else why)
    statics = {r: RUNNERS[r].precision for r in want if r.startswith("kiln-static")}
    if statics:
        # Slot length = prompt + new tokens: what genai's shared KV buffer holds (max_length).
        static = export_model(hf_dir, work / "onnx-static", precision="fp32", kv="static",
                              max_context=args.prompt + args.new)  # fmt: skip
        for runner, precision in sorted(statics.items()):
            opt, why = ort_target(static, work / f"ort-{precision}", precision)
            if opt is not None:
                got[runner] = (opt, f"static, optimize -t onnxruntime -p {precision}")
            elif precision == "fp32":
                got[runner] = (static, "plain static export (no ORT optimize target)")
                log.info("%s / %s: %s; using the plain static export", name, runner, why)
            else:
                got[runner] = (None, why)
    for runner in sorted(r for r in want if r.startswith("genai")):
        precision = RUNNERS[runner].precision
        folder = work / ("genai" if precision == "fp32" else f"genai-{precision}")
        built, why = build_genai(hf_dir, folder, precision)
        got[runner] = (built, f"genai builder -p {precision} -e cpu" if built else why)
    for runner in sorted(r for r in want if r.startswith("llamacpp")):
        quant = runner.split("-")[1].upper()
        gguf, why = llamacpp_runner.build_gguf(hf_dir, work / "gguf", quant)
        how = f", llama_model_quantize {quant}" if quant != "F32" else ""
        note = f"convert_hf_to_gguf.py f32{how}"
        got[runner] = (gguf, note if gguf else why)
    return got


class Worker:
    """One runner's child process: started and warmed up once, then asked for repeats."""

    def __init__(self, runner: str, model: Path, ids: Path, work: Path, args: argparse.Namespace):
        from bench.race_runners import MARK

        self.mark = MARK
        self.log_path = work / f"{runner}.log"
        cmd = [sys.executable, "-m", "bench.race_runners", RUNNERS[runner].kind, str(model),
               str(ids), "--new", str(args.new), "--threads", str(args.threads),
               "--spin", args.spin, "--batches", ",".join(map(str, args.batches))]  # fmt: skip
        log.info("  $ %s", " ".join(cmd[2:]))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log_path.open("w"), text=True)  # fmt: skip

    def answer(self, say: str | None = None) -> dict[str, Any]:
        """Send `say` (if any) and return the next protocol line; RuntimeError if it died."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        if say is not None:
            self.proc.stdin.write(say + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(self.mark):
                return json.loads(line[len(self.mark) :])
        self.proc.wait()
        tail = [ln for ln in self.log_path.read_text().splitlines() if ln.strip()][-1:]
        raise RuntimeError(f"exit {self.proc.returncode}: {tail[0][:200] if tail else ''}")

    def close(self) -> float | None:
        """Peak RSS in MiB, once the worker has quit."""
        try:
            peak = self.answer("quit").get("peak_rss_mib")
        except (RuntimeError, BrokenPipeError):
            peak = None
        self.proc.wait()
        return peak


def summarize(reps: list[dict[str, Any]], batches: list[int]) -> dict[str, Any]:
    """Median and spread (min, max) over repeats of TTFT and decode tok/s per batch size."""
    out: dict[str, Any] = {}
    for b in map(str, batches):
        row: dict[str, Any] = {}
        for key in ("ttft_s", "decode_tok_s", "total_s"):
            xs = [r["batches"][b][key] for r in reps]
            row[key] = float(np.median(xs))
            row[key + "_spread"] = (min(xs), max(xs))
            row[key + "_samples"] = xs
        out[b] = row
    return out


def race(work: Path, models: dict[str, tuple[Path | None, str]], args: argparse.Namespace,
         name: str) -> dict[str, Any]:  # fmt: skip
    """Load every runner, then run them round-robin over repeats; one result per runner."""
    results: dict[str, Any] = {}
    workers: dict[str, Worker] = {}
    for r in args.runners:
        folder, note = models[r]
        base = {"artifact_note": note, "precision": RUNNERS[r].precision}
        if folder is None:
            results[r] = {"skipped": note, **base}
            log.info("%s / %s: skipped (%s)", name, r, note)
            continue
        log.info("%s / %s (%s): loading ...", name, r, note)
        w = Worker(r, folder, work / "ids.npy", work, args)
        try:
            ready = w.answer()
        except RuntimeError as e:
            log.warning("%s / %s failed to start: %s", name, r, e)
            results[r] = {"skipped": f"runner failed: {e}", **base}
            continue
        workers[r] = w
        results[r] = {**base, "settings": ready["settings"], "load_s": ready["load_s"], "reps": []}
    for k in range(args.repeats):
        for r, w in list(workers.items()):
            try:
                rep = w.answer("rep")
            except RuntimeError as e:
                log.warning("%s / %s failed in repeat %d: %s", name, r, k + 1, e)
                results[r] = {**results[r], "skipped": f"runner failed: {e}"}
                del workers[r]
                continue
            results[r]["reps"].append(rep)
            b1 = rep["batches"][str(args.batches[0])]
            ms, tok_s = b1["ttft_s"] * 1e3, b1["decode_tok_s"]
            log.info("%s rep %d/%d %-18s TTFT %6.0f ms  b1 %6.1f tok/s", name, k + 1,
                     args.repeats, r, ms, tok_s)  # fmt: skip
    for r, w in workers.items():
        results[r]["peak_rss_mib"] = w.close()
        results[r]["batches"] = summarize(results[r]["reps"], args.batches)
        results[r]["tokens"] = results[r]["reps"][0].get("tokens", [])
    return results


def _profile(args_: list[str], out: Path) -> dict[str, Any]:
    """A kiln runner's profile as JSON, or {"skipped": why} when it failed (the rest goes on)."""
    cmd = [sys.executable, "-m", "bench.race_runners", "profile", *args_, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:]
        return {"skipped": f"profile failed: {last[0][:200] if last else proc.returncode}"}
    return json.loads(out.read_text())


def _prepared(
    name: str, work: Path, args: argparse.Namespace
) -> tuple[int, int, dict[str, tuple[Path | None, str]], float]:
    """The bench model, its weight bytes per step and every runner's artifact (prepare)."""
    hf_dir = make_model(name, work / "hf")
    wbytes, nparams = weight_bytes_per_step(hf_dir)
    log.info("%s: %.1fM parameters, %.0f MB of fp32 weights read per decode step", name,
             nparams / 1e6, wbytes / 1e6)  # fmt: skip
    t0 = time.perf_counter()
    models = prepare(name, work, args)
    return wbytes, nparams, models, time.perf_counter() - t0


def run_model(name: str, work: Path, args: argparse.Namespace, bw: float) -> dict[str, Any]:
    """Export/build what the runners need, race them, then profile kiln's loops.

    Exporting, optimizing and counting weights load the model in PyTorch (GBs of peak memory
    that a process does not give back); a spawned child does them and exits, so this process
    holds no model while a dozen runners load theirs (in one process it ran out of memory).
    """
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=spawn, initializer=setup_logging, initargs=(0,)) as pool:
        wbytes, nparams, models, prepare_s = pool.submit(_prepared, name, work, args).result()
    hf_dir = work / "hf"
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(1).integers(3, vocab, size=(max(args.batches), args.prompt))
    np.save(work / "ids.npy", ids.astype(np.int64))
    runners = race(work, models, args, name)
    profiles: dict[str, Any] = {}
    for r in (r for r in PROFILED if r in args.runners and args.profile_new):
        if "skipped" in runners[r]:
            continue
        log.info("%s / %s profile ...", name, r)
        profiles[r] = _profile([str(models[r][0]), str(work / "ids.npy"), "--new",
                                str(args.profile_new), "--threads", str(args.threads),
                                "--spin", args.spin], work / f"profile-{r}.json")  # fmt: skip
    return {
        "params": nparams,
        "weight_bytes_per_step": wbytes,
        "roofline_tok_s_b1": bw * 1e9 / wbytes,
        "prepare_s": prepare_s,
        "artifacts": {r: [str(f) if f else None, n] for r, (f, n) in models.items()},
        "runners": runners,
        "profiles": profiles,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table, the target ratios and the profiles."""
    from bench import race_report as report

    cores = len(os.sched_getaffinity(0))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--models", default="smollm,gpt2", help="comma-separated: smollm, gpt2")
    p.add_argument(
        "--runners", default=",".join(RUNNERS), help=f"comma-separated of {list(RUNNERS)}"
    )
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per runner (min = max)")
    p.add_argument("--batches", default="1,4", help="batch sizes for decode tokens/s")
    p.add_argument("--repeats", type=int, default=5, help="round-robin repeats (median kept)")
    p.add_argument("--threads", type=int, default=cores, help=f"intra-op threads (default {cores})")
    p.add_argument("--spin", choices=["on", "off"], default="on",
                   help="ONNX Runtime intra-op spinning for kiln and genai")  # fmt: skip
    p.add_argument("--profile-new", type=int, default=32, help="decode steps profiled (0: none)")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    asked = args.runners.split(",")
    if unknown := sorted(set(asked) - set(RUNNERS)):
        p.error(f"unknown runners {unknown}; choose from {', '.join(RUNNERS)}")
    args.runners = [r for r in RUNNERS if r in asked]  # table order
    setup_logging(0)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    bw = matvec_bandwidth_gb_s()
    log.info("matrix-vector bandwidth: %.1f GB/s (%d cores, load average %.1f %.1f %.1f)", bw,
             cores, *load_start)  # fmt: skip
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, args.out / name, args, bw)
    load_end = os.getloadavg()
    conditions = {"threads": args.threads, "spin": args.spin, "repeats": args.repeats,
                  "cores": cores, "load_start": load_start, "load_end": load_end,
                  "prompt": args.prompt, "new": args.new}  # fmt: skip
    text = report.table(results, bw, args.batches, args.runners, conditions)
    bars = report.ratios(results)
    print(f"{text}\n\ntarget ratios:\n{report.ratios_text(bars)}\n\n"
          f"profile of kiln's loops (batch 1):\n{report.profile_text(results)}")  # fmt: skip
    from kiln.artifacts import tool_versions, write_json_atomic

    write_json_atomic(
        args.out / "bench.json",
        {
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "matvec_bandwidth_gb_s": bw,
            "cores": cores,
            "load_average_start_end": [load_start, load_end],
            "versions": tool_versions(
                "onnxruntime",
                "onnxruntime-genai",
                "torch",
                "transformers",
                "llama-cpp-python",
                "gguf",
            ),
            "models": results,
            "table": text,
            "ratios": bars,
            "elapsed_s": time.perf_counter() - t0,
        },
    )
    report.chart(results, args.batches, args.runners, bw, args.out / "bench.png")
    log.info("bench done in %.0f s -> %s", time.perf_counter() - t0, args.out / "bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
