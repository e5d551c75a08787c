"""`make bench-engine`: kiln's engine build against a bare `polygraphy convert`, same run.

A GPT-2-small-shaped model (124M: 12 layers, 768 wide, 12 heads, vocab 50257) with seeded
random weights is exported in fp16 by kiln, then built for one GPU profile (default SM86+SM89
fp16) alternately by `kiln build --force` and by `polygraphy convert` with TensorRT-RTX
(POLYGRAPHY_USE_TENSORRT_RTX=1) on the same ONNX with the same targets, optimization profiles,
builder level and workspace limit (read back from kiln's engine.json). Each is a child process,
so wall time and peak RSS (os.wait4) cover the whole tool. Prints kiln's overhead ratio, peak
memory, and the engine size against the ONNX weight bytes.

usage: python -m bench.engine_build [--out out/bench-engine] [--profile NAME] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.race import GPT2_SMALL
from kiln.engine.profiles import load_profile
from kiln.log import setup_logging

log = logging.getLogger("kiln.bench.engine_build")  # also under `python -m`


def make_gpt2_small(folder: Path, seed: int = 0) -> Path:
    """Save a GPT-2-small-shaped model with seeded random weights (no hub access needed)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers as T

    torch.manual_seed(seed)
    cfg = T.GPT2Config(**GPT2_SMALL, bos_token_id=50256, eos_token_id=50256)
    T.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return folder


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Run `cmd`; return its wall and CPU seconds and peak RSS in MiB (its own, via wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mib": usage.ru_maxrss / 1024}


def polygraphy_cmd(onnx: Path, manifest: dict[str, Any], plan: Path) -> list[str]:
    """`polygraphy convert` with the targets, shapes and builder settings kiln used."""
    builder = manifest["profile"]["builder"]
    cmd = [
        str(Path(sys.executable).with_name("polygraphy")),
        "convert",
        str(onnx),
        "--convert-to",
        "trt",
        "--strongly-typed",
        "--compute-capabilities",
        *manifest["compute_capabilities"],
        "--builder-optimization-level",
        str(builder["optimization_level"]),
        "-o",
        str(plan),
    ]
    if builder.get("workspace_mib"):
        cmd += ["--pool-limit", f"workspace:{builder['workspace_mib']}M"]
    for prof in manifest["optimization_profiles"]:
        inputs = {n: t for n, t in prof["tensors"].items() if t["mode"] == "input"}
        for which in ("min", "opt", "max"):
            specs = [f"{n}:[{','.join(map(str, t[which]))}]" for n, t in inputs.items()]
            cmd += [f"--trt-{which}-shapes", *specs]
    return cmd


def main(argv: list[str] | None = None) -> int:
    """Build the same engine with kiln and with polygraphy, alternating; print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("out/bench-engine"), help="work folder")
    ap.add_argument("--profile", default="rtx-ampere-ada-fp16", help="GPU profile to build")
    ap.add_argument("--repeats", type=int, default=5, help="builds per tool (alternating rounds)")
    ap.add_argument("--make-model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    setup_logging(0)
    if args.make_model:
        make_gpt2_small(args.make_model)
        return 0

    gpu = load_profile(args.profile)
    # Model and export run in child processes: a fork of a parent holding torch and the model
    # would start every measured child at the parent's RSS (ru_maxrss survives exec).
    hf, art = args.out / "gpt2-small" / "hf", args.out / "gpt2-small" / "onnx-fp16"
    if not (hf / "config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "bench.engine_build", "--make-model", str(hf)], check=True
        )
    # Random weights give near-flat logits, so fp16 greedy agreement with fp32 is meaningless
    # here (ties); the export's error bound is still checked and recorded (--allow-drift).
    kiln_exe = str(Path(sys.executable).with_name("kiln"))
    export = [
        kiln_exe,
        "export",
        str(hf),
        "--precision",
        "fp16",
        "--allow-drift",
        "--out",
        str(art),
    ]
    subprocess.run(export, check=True)
    log.info("bench parent RSS before the measured builds: %d MiB", _self_rss_mib())
    kiln = [kiln_exe, "-q", "build", str(art)]
    kiln += ["--profile", args.profile, "--out", str(args.out / "engines"), "--force"]
    poly_env = {**os.environ, "POLYGRAPHY_USE_TENSORRT_RTX": "1"}
    runs: dict[str, list[dict[str, float]]] = {"kiln build": [], "polygraphy convert": []}
    poly = None
    for i in range(args.repeats):
        log.info("round %d/%d: kiln build", i + 1, args.repeats)
        runs["kiln build"].append(run_child(kiln))
        manifest = json.loads((args.out / "engines" / gpu.name / "engine.json").read_text())
        poly = poly or polygraphy_cmd(art / "model.onnx", manifest, args.out / "polygraphy.plan")
        log.info("round %d/%d: polygraphy convert", i + 1, args.repeats)
        runs["polygraphy convert"].append(run_child(poly, env=poly_env))
    _report(runs, manifest, art, args.out / "polygraphy.plan")
    return 0


def _report(
    runs: dict[str, list[dict[str, float]]], m: dict[str, Any], art: Path, poly: Path
) -> None:
    export = json.loads((art / "export.json").read_text())
    med = {k: statistics.median(r["wall_s"] for r in v) for k, v in runs.items()}
    peak = {k: max(r["peak_rss_mib"] for r in v) for k, v in runs.items()}
    sizes = {"kiln build": m["plan"]["bytes"], "polygraphy convert": poly.stat().st_size}
    cfg = export["config"]
    print(
        f"\nGPT-2-small-shaped fp16, profile {m['profile']['name']} "
        f"(targets {'+'.join(m['compute_capabilities'])}, {len(m['optimization_profiles'])} "
        f"optimization profiles), {m['library']['name']} {m['library']['version']}"
    )
    print(f"{'tool':<20} {'median':>8} {'min':>8}  {'runs (s)':<30} {'peak RSS (MiB)':<24} engine")
    for k, v in runs.items():
        each = " ".join(f"{r['wall_s']:.1f}" for r in v)
        rss = " ".join(f"{r['peak_rss_mib']:.0f}" for r in v)
        best = min(r["wall_s"] for r in v)
        print(
            f"{k:<20} {med[k]:>6.2f} s {best:>6.2f} s  {each:<30} {rss:<24} {sizes[k] / 1e6:.1f} MB"
        )
    # Builds alternate, so each round's pair shares the machine's load at that moment: the
    # median of the paired ratios is the headline; the ratio of the fastest runs backs it up.
    pairs = [a["wall_s"] / b["wall_s"] for a, b in zip(*runs.values(), strict=True)]
    ratio = statistics.median(pairs)
    fastest = min(r["wall_s"] for r in runs["kiln build"]) / min(
        r["wall_s"] for r in runs["polygraphy convert"]
    )
    print(
        f"kiln overhead over the bare library build: {ratio:.3f}x median of paired rounds "
        f"({(ratio - 1) * 100:+.1f}%; target <= +10%); fastest vs fastest {fastest:.3f}x; "
        f"rounds {' '.join(f'{x:.2f}' for x in pairs)}"
    )
    cpu = {k: statistics.median(r["cpu_s"] for r in v) for k, v in runs.items()}
    print(
        f"CPU time (user+sys, median): kiln {cpu['kiln build']:.1f} s, polygraphy "
        f"{cpu['polygraphy convert']:.1f} s ({cpu['kiln build'] / cpu['polygraphy convert']:.3f}x)"
    )
    print(f"kiln peak memory: {peak['kiln build']:.0f} MiB (target < 2048 MiB)")
    t = m["build"]["elapsed_s"]
    print(
        f"kiln in-process split (last run): hash {t['hash']:.2f} s, parse {t['parse']:.2f} s, "
        f"build {t['build']:.2f} s, write {t.get('write', 0):.2f} s, total {t['total']:.2f} s "
        "(the hash runs beside the parse and build)"
    )
    weights = _initializer_bytes(art / "model.onnx")
    tied = cfg["vocab"] * cfg["hidden"] * 2
    print(
        f"engine {m['plan']['bytes'] / 1e6:.1f} MB vs {weights / 1e6:.1f} MB of weights "
        f"in the ONNX initializers (+{(m['plan']['bytes'] - weights) / 1e6:.1f} MB; "
        "one copy of the tied embedding "
        f"[{cfg['vocab']}, {cfg['hidden']}] fp16 is {tied / 1e6:.1f} MB)"
    )


def _self_rss_mib() -> int:
    """This process's current resident memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def _initializer_bytes(onnx_path: Path) -> int:
    """Bytes of every initializer in the ONNX (each tensor once, as stored)."""
    import numpy as np
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    total = 0
    for t in graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        total += int(np.prod(t.dims, dtype=np.int64)) * itemsize
    return total


if __name__ == "__main__":
    raise SystemExit(main())
