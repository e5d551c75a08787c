"""`make bench`: the race. kiln on ONNX Runtime CPU against transformers and onnxruntime-genai.

One run, same models and input ids for every runner, each runner in its own child process
(bench/race_runners.py) so peak memory is its own, every runner producing exactly `--new`
tokens (min = max new tokens). Runners: kiln concat fp32, kiln static fp32 and static int4 (the
ONNX Runtime target of `kiln optimize` when this kiln has it, else the plain static export for
fp32), transformers eager, onnxruntime-genai fp32 and int4 (its own model builder). Models: a
SmolLM-135M-shaped Llama and a GPT-2-small-shaped model, seeded random weights.

Reports time to first token for a `--prompt`-token prompt, decode tokens/s at batch 1 and 4,
peak RSS, ratios to PyTorch eager, each runner's batch-1 decode speed as a percentage of the
weight-streaming roofline (fp32 weight bytes per decode step against this machine's
matrix-vector bandwidth, measured in the same run), and the target ratios
(bench/race_report.py BARS) with met / not met.
Then profiles kiln's loops (ONNX Runtime per-op times, KV bytes copied per step). Writes
bench.json and bench.png into --out.

usage: python -m bench.race [--out out/bench] [--models smollm,gpt2] [--runners ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from kiln.log import setup_logging

log = logging.getLogger("kiln.bench.race")

SMOLLM_135M = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
GPT2_SMALL = {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
RUNNERS = ("kiln", "kiln-ort", "kiln-static", "kiln-static-int4", "hf", "genai", "genai-int4")
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


def _child(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "bench.race_runners", *args]
    log.info("  $ %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


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
    """Each selected runner's model folder (or None) and a note saying what it is."""
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
    if want & {"kiln-static", "kiln-static-int4"}:
        # Slot length = prompt + new tokens: what genai's shared KV buffer holds (max_length).
        static = export_model(hf_dir, work / "onnx-static", precision="fp32", kv="static",
                              max_context=args.prompt + args.new)  # fmt: skip
        for runner, precision in (("kiln-static", "fp32"), ("kiln-static-int4", "int4")):
            if runner not in want:
                continue
            opt, why = ort_target(static, work / f"ort-{precision}", precision)
            if opt is not None:
                got[runner] = (opt, f"optimize -t onnxruntime -p {precision}")
            elif precision == "fp32":
                got[runner] = (static, "plain static export (no ORT optimize target)")
                log.info("%s / %s: %s; using the plain static export", name, runner, why)
            else:
                got[runner] = (None, why)
    for runner, precision in (("genai", "fp32"), ("genai-int4", "int4")):
        if runner in want:
            folder = work / ("genai" if precision == "fp32" else f"genai-{precision}")
            built, why = build_genai(hf_dir, folder, precision)
            got[runner] = (built, f"genai builder -p {precision}" if built else why)
    return got


def _try_child(args: list[str], out: Path) -> dict[str, Any]:
    """A runner's JSON, or {"skipped": why} when it failed (the rest of the race goes on)."""
    try:
        _child(args)
    except RuntimeError as e:
        log.warning("runner failed: %s", e)
        return {"skipped": f"runner failed: {str(e).strip().splitlines()[-1][:200]}"}
    return json.loads(out.read_text())


def run_model(name: str, work: Path, args: argparse.Namespace, bw: float) -> dict[str, Any]:
    """Export/build what the runners need, then run each runner and profile kiln's."""
    hf_dir = make_model(name, work / "hf")
    wbytes, nparams = weight_bytes_per_step(hf_dir)
    log.info("%s: %.1fM parameters, %.0f MB of fp32 weights read per decode step", name,
             nparams / 1e6, wbytes / 1e6)  # fmt: skip
    t0 = time.perf_counter()
    models = prepare(name, work, args)
    prepare_s = time.perf_counter() - t0
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(1).integers(3, vocab, size=(max(args.batches), args.prompt))
    np.save(work / "ids.npy", ids.astype(np.int64))
    runners: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    batches = ",".join(str(b) for b in args.batches)
    for r in args.runners:
        folder, note = models[r]
        if folder is None:
            runners[r] = {"skipped": note}
            log.info("%s / %s: skipped (%s)", name, r, note)
            continue
        log.info("%s / %s (%s) ...", name, r, note)
        kind = "genai" if r.startswith("genai") else "kiln" if r.startswith("kiln") else r
        out = work / f"{r}.json"
        runners[r] = _try_child([kind, str(folder), str(work / "ids.npy"), str(out),
                                 "--new", str(args.new), "--batches", batches,
                                 "--repeats", str(args.repeats)], out)  # fmt: skip
        runners[r]["artifact_note"] = note
        if r in PROFILED and args.profile_new and "skipped" not in runners[r]:
            log.info("%s / %s profile ...", name, r)
            pout = work / f"profile-{r}.json"
            profiles[r] = _try_child(["profile", str(folder), str(work / "ids.npy"), str(pout),
                                      "--new", str(args.profile_new)], pout)  # fmt: skip
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

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--models", default="smollm,gpt2", help="comma-separated: smollm, gpt2")
    p.add_argument("--runners", default=",".join(RUNNERS), help=f"comma-separated of {RUNNERS}")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per runner (min = max)")
    p.add_argument("--batches", default="1,4", help="batch sizes for decode tokens/s")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per figure (best kept)")
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
    bw = matvec_bandwidth_gb_s()
    load_before = os.getloadavg()
    log.info("matrix-vector bandwidth: %.1f GB/s (%d cores, load average %.1f)", bw,
             os.cpu_count() or 0, load_before[0])  # fmt: skip
    results = {}
    for name in args.models.split(","):
        results[name] = run_model(name, args.out / name, args, bw)
    text = report.table(results, bw, args.batches, args.runners)
    bars = report.ratios(results)
    load = (load_before[0], os.getloadavg()[0])
    print(f"{text}\n\ntarget ratios:\n{report.ratios_text(bars)}\n\n"
          f"profile of kiln's loops (batch 1):\n{report.profile_text(results)}")  # fmt: skip
    print(f"1-min load average at start/end: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} cores")
    from kiln.artifacts import tool_versions, write_json_atomic

    write_json_atomic(
        args.out / "bench.json",
        {
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "matvec_bandwidth_gb_s": bw,
            "cores": os.cpu_count(),
            "load_average_start_end": load,
            "versions": tool_versions("onnxruntime", "onnxruntime-genai", "torch", "transformers"),
            "models": results,
            "table": text,
            "ratios": bars,
            "elapsed_s": time.perf_counter() - t0,
        },
    )
    report.chart(results, args.batches, args.runners, args.out / "bench.png")
    log.info("bench done in %.0f s -> %s", time.perf_counter() - t0, args.out / "bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
