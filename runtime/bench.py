"""`make bench`: kiln's decode loop on ONNX Runtime CPU against transformers and onnxruntime-genai.

One run, same models and input ids for every runner, each runner in its own child process
(runtime/bench_runners.py) so peak memory is its own, every runner producing exactly
`--new` tokens (min = max new tokens). Models: a SmolLM-135M-shaped Llama and a GPT-2-small-
shaped model, seeded random weights. Reports time to first token for a `--prompt`-token prompt,
decode tokens/s at batch 1 and 4, peak RSS, ratios to PyTorch eager, and each runner's batch-1
decode speed as a percentage of the weight-streaming roofline: fp32 weight bytes read per decode
step against this machine's matrix-vector bandwidth, measured in the same run. Then profiles
kiln's loop (ONNX Runtime per-op times, KV bytes copied per step). Writes bench.json and
bench.png into --out.

usage: python -m kiln.runtime.bench [--out out/bench] [--models smollm,gpt2] [--new 128]
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

log = logging.getLogger("kiln.runtime.bench")

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
RUNNERS = ("kiln", "hf", "genai")
LABELS = {
    "kiln": "kiln (ORT CPU, concat KV)",
    "hf": "transformers eager",
    "genai": "onnxruntime-genai",
}


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
    cmd = [sys.executable, "-m", "kiln.runtime.bench_runners", *args]
    log.info("  $ %s", " ".join(cmd[2:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"runner failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def build_genai(hf_dir: Path, out: Path) -> tuple[Path | None, str]:
    """onnxruntime-genai's own fp32 CPU model (its builder), or None and the reason."""
    if (out / "genai_config.json").is_file():
        return out, "ok"
    cache = str(out.parent / "genai-cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", cache]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not (out / "genai_config.json").is_file():
        arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
        last = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()][-1:]
        why = last[0].replace(str(hf_dir), arch) if last else f"exit {proc.returncode}"
        return None, f"onnxruntime-genai's model builder refused {arch} ({why})"
    return out, "ok"


def run_model(name: str, work: Path, args: argparse.Namespace, bw: float) -> dict[str, Any]:
    """Export, build genai, run every runner and the profile for one model."""
    from kiln.export import export_model

    hf_dir = make_model(name, work / "hf")
    wbytes, nparams = weight_bytes_per_step(hf_dir)
    log.info("%s: %.1fM parameters, %.0f MB of fp32 weights read per decode step", name,
             nparams / 1e6, wbytes / 1e6)  # fmt: skip
    t0 = time.perf_counter()
    artifact = export_model(hf_dir, work / "onnx", precision="fp32")
    export_s = time.perf_counter() - t0
    vocab = json.loads((artifact / "export.json").read_text())["config"]["vocab"]
    ids = np.random.default_rng(1).integers(3, vocab, size=(max(args.batches), args.prompt))
    np.save(work / "ids.npy", ids.astype(np.int64))
    genai_dir, genai_note = build_genai(hf_dir, work / "genai")
    models = {"kiln": artifact, "hf": hf_dir, "genai": genai_dir}
    runners: dict[str, Any] = {}
    for r in RUNNERS:
        if models[r] is None:
            runners[r] = {"skipped": genai_note}
            log.info("%s / %s: skipped (%s)", name, r, genai_note)
            continue
        log.info("%s / %s ...", name, r)
        out = work / f"{r}.json"
        batches = ",".join(str(b) for b in args.batches)
        _child([r, str(models[r]), str(work / "ids.npy"), str(out), "--new", str(args.new),
                "--batches", batches, "--repeats", str(args.repeats)])  # fmt: skip
        runners[r] = json.loads(out.read_text())
    log.info("%s / kiln profile ...", name)
    _child(["profile", str(artifact), str(work / "ids.npy"), str(work / "profile.json"),
            "--new", str(args.profile_new)])  # fmt: skip
    roof = bw * 1e9 / wbytes
    return {
        "params": nparams,
        "weight_bytes_per_step": wbytes,
        "roofline_tok_s_b1": roof,
        "export_s": export_s,
        "runners": runners,
        "profile": json.loads((work / "profile.json").read_text()),
    }


def table(results: dict[str, Any], bw: float, batches: list[int]) -> str:
    """The comparison table: one row per model and runner, ratios to transformers eager."""
    head = (f"{'model':<8} {'runner':<26} {'TTFT ms':>8} "
            + " ".join(f"{'tok/s b' + str(b):>10}" for b in batches)
            + f" {'vs HF b1':>8} {'vs HF b4':>8} {'TTFT vs HF':>10} {'roofline':>8} "
            f"{'peak MiB':>8} {'agree':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for model, res in results.items():
        hf = res["runners"].get("hf", {})
        for r in RUNNERS:
            d = res["runners"].get(r, {})
            if "batches" not in d:
                lines.append(f"{model:<8} {LABELS[r]:<26} n/a: {d.get('skipped', '?')}")
                continue
            b = d["batches"]
            tok = [b[str(x)]["decode_tok_s"] for x in batches]
            vs = [tok[i] / hf["batches"][str(x)]["decode_tok_s"] for i, x in enumerate(batches)]
            ttft = b[str(batches[0])]["ttft_s"]
            ttft_vs = hf["batches"][str(batches[0])]["ttft_s"] / ttft
            roof = tok[0] / res["roofline_tok_s_b1"]
            agree = np.mean(np.array(d["tokens"]) == np.array(hf["tokens"]))
            lines.append(
                f"{model:<8} {LABELS[r]:<26} {ttft * 1e3:8.0f} "
                + " ".join(f"{t:10.1f}" for t in tok)
                + f" {vs[0]:7.2f}x {vs[-1]:7.2f}x {ttft_vs:9.2f}x {roof:8.0%} "
                f"{d['peak_rss_mib']:8.0f} {agree:6.0%}"
            )
    lines.append(
        f"roofline: fp32 weight bytes per decode step at {bw:.1f} GB/s measured matrix-vector "
        "bandwidth (numpy sgemv, same run); 'vs HF' = tokens/s ratio, 'TTFT vs HF' = HF TTFT / "
        "runner TTFT; 'agree' = row-0 greedy tokens equal to HF's."
    )
    return "\n".join(lines)


def profile_text(results: dict[str, Any]) -> str:
    """Where kiln's time goes, per model."""
    out = []
    for model, res in results.items():
        p = res["profile"]
        ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in p["ops"][:8])
        loop = p["loop_overhead_s"] / p["wall_s"]
        step_ms = p["decode_graph_ms_per_step"]
        kv_mb = p["kv_bytes_copied_per_step_mean"] / 1e6
        out.append(
            f"{model}: graph {p['graph_s']:.2f} s of {p['wall_s']:.2f} s wall (loop/Python "
            f"{loop:.1%}); decode step {step_ms:.1f} ms in ORT; KV copied per step (concat "
            f"present) {kv_mb:.2f} MB mean; ops by time: {ops}"
        )
    return "\n".join(out)


def chart(results: dict[str, Any], batches: list[int], path: Path) -> None:
    """Bar charts: decode tokens/s per batch size and TTFT, per model and runner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4))
    width = 0.8 / len(RUNNERS)
    for k, r in enumerate(RUNNERS):
        xs = np.arange(len(models)) + k * width
        for j, b in enumerate(batches):
            vals = [results[m]["runners"].get(r, {}).get("batches", {}).get(str(b), {})
                    .get("decode_tok_s", 0) for m in models]  # fmt: skip
            axes[j].bar(xs, vals, width, label=LABELS[r])
            axes[j].set_title(f"decode tokens/s, batch {b} (higher is better)")
        ttft = [results[m]["runners"].get(r, {}).get("batches", {}).get(str(batches[0]), {})
                .get("ttft_s", 0) * 1e3 for m in models]  # fmt: skip
        axes[-1].bar(xs, ttft, width, label=LABELS[r])
    axes[-1].set_title("time to first token, ms (lower is better)")
    for ax in axes:
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("out/bench"))
    p.add_argument("--models", default="smollm,gpt2", help="comma-separated: smollm, gpt2")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--new", type=int, default=128, help="new tokens per runner (min = max)")
    p.add_argument("--batches", default="1,4", help="batch sizes for decode tokens/s")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per figure (best kept)")
    p.add_argument("--profile-new", type=int, default=32, help="decode steps in the profile")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
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
    text = table(results, bw, args.batches)
    prof = profile_text(results)
    load = (load_before[0], os.getloadavg()[0])
    print(text + "\n\nprofile of kiln's loop (batch 1):\n" + prof)
    print(f"1-min load average at start/end: {load[0]:.1f}/{load[1]:.1f} on {os.cpu_count()} cores")
    from kiln.manifest import tool_versions, write_json_atomic

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
            "elapsed_s": time.perf_counter() - t0,
        },
    )
    chart(results, args.batches, args.out / "bench.png")
    log.info("bench done in %.0f s -> %s", time.perf_counter() - t0, args.out / "bench.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
