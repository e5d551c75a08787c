"""`make compress-report`: every compression method on the eval model, one table and one chart.

Each method makes an onnxruntime-target artifact from the same fp32 export; `kiln eval` scores
it on the held-out text against the fp32 export (perplexity, mean KL, top-1, greedy agreement
over 64 tokens), and CPU decode tok/s at batch 1 and 4 is timed round-robin over all artifacts
(so they share the machine's noise; load average recorded). Calibration text is the eval
corpus's training split (models/train_eval.py), never the held-out files.
Writes OUT/report.md, OUT/report.json and OUT/size_vs_kl.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("compress-report")
MODEL = Path("models/eval-llama")
MIB = 2**20


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of the graph's initializers (the weights it stores)."""
    import onnx

    proto = onnx.load(str(onnx_path))
    return sum(
        len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer
    )


def make_variants(
    model: Path, out: Path, calib: Path, export: Path, prunes: list[str]
) -> dict[str, Path]:
    """Every method's onnxruntime-target artifact, by label (a rerun keeps finished folders)."""
    from kiln.compress import PruneSpec, prune_model
    from kiln.export import export_model
    from kiln.optimize import optimize_model
    from kiln.optimize.methods import compress_artifact

    v: dict[str, Path] = {}

    def made(name: str) -> bool:
        return (out / name / "optimize.json").is_file()

    for p in ("fp32", "int8", "int4"):
        name = {"fp32": "fp32", "int8": "int8-rtn", "int4": "int4-rtn"}[p]
        if not made(name):
            optimize_model(export, out / name, target="onnxruntime", precision=p,
                           allow_drift=True, check_torch=False)  # fmt: skip
        v[name] = out / name
    if not made("int4-gptq"):
        compress_artifact(export, out / "int4-gptq", method="gptq-int4", calibration=calib,
                          target="onnxruntime")  # fmt: skip
    v["int4-gptq"] = out / "int4-gptq"
    lo, hi = (weight_bytes(v[n] / "model.onnx") for n in ("int4-rtn", "int8-rtn"))
    budget = round((lo + hi) / 2 / MIB, 2)
    if not made("mixed"):
        compress_artifact(export, out / "mixed", method="mixed", calibration=calib,
                          target="onnxruntime", weight_budget_mib=budget)  # fmt: skip
    v[f"mixed@{budget}MiB"] = out / "mixed"
    for m in ("sparse24", "sparse24-calibrated"):
        if not made(m):
            compress_artifact(export, out / m, method=m, calibration=calib, target="onnxruntime")
        v[m] = out / m
    specs = {
        "prune-mlp10": PruneSpec(mlp=0.1),
        "prune-mlp20": PruneSpec(mlp=0.2),
        "prune-mlp30": PruneSpec(mlp=0.3),
        "prune-layers25": PruneSpec(layers=0.25),
        "prune-kv50": PruneSpec(kv_groups=0.5),
    }
    for name, spec in specs.items():
        if name not in prunes:
            continue
        if made(name):
            v[name] = out / name
            continue
        if not (out / f"{name}-hf" / "prune.json").is_file():  # a rerun keeps what it made
            hf = prune_model(model, out / f"{name}-hf", calibration=calib, spec=spec)
            log.info("%s: %s", name, hf["gate"])
        onnx = export_model(out / f"{name}-hf", out / f"{name}-onnx", precision="fp32")
        v[name] = optimize_model(onnx, out / name, target="onnxruntime", precision="fp32",
                                 allow_drift=True, check_torch=False)  # fmt: skip
    return v


def decode_tps(onnx_dir: Path, batch: int, steps: int = 32, threads: int = 2) -> float:
    """Decode tokens/s after a 16-token prefill, batch `batch`, greedy, one token per call."""
    from kiln.graph_io import stepper

    run = stepper(onnx_dir / "model.onnx", rows=batch, threads=threads)
    run.reset(batch)
    ids = np.random.default_rng(0).integers(3, 1000, (batch, 16), np.int64)
    logits = run.append(ids, 0)
    t0 = time.perf_counter()
    for i in range(steps):
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        logits = run.append(nxt, 16 + i)
    return batch * steps / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    """Make the variants, score them, time them interleaved, write the table and the chart."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/compress"))
    ap.add_argument("--model", type=Path, default=MODEL, help="the eval model folder")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens scored")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin timing repeats")
    ap.add_argument(
        "--prunes",
        default="prune-mlp10,prune-mlp20,prune-mlp30,prune-layers25,prune-kv50",
        help="pruned variants to make (comma-separated)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from kiln.evaluate import EvalOptions, evaluate_model
    from kiln.export import export_model

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    from kiln.models.train_eval import calibration_text

    calib = calibration_text(out / "calibration.txt")
    export = export_model(args.model, out / "export-fp32", precision="fp32")
    variants = make_variants(args.model, out, calib, export, args.prunes.split(","))
    rows: dict[str, dict[str, Any]] = {}
    for name, path in variants.items():
        opts = EvalOptions(tokens=args.tokens)
        rep = evaluate_model(
            path,
            reference=export,
            text=args.model / "heldout.txt",
            out=out / "eval" / name,
            options=opts,
        )
        r = rep.results
        rows[name] = {
            "weight_bytes": weight_bytes(path / "model.onnx"),
            "perplexity": r["perplexity"],
            "kl_mean": r["kl_mean"],
            "top1": r["top1_agreement"],
            "greedy64": r["greedy_agreement"],
            "tps": {1: [], 4: []},
        }
    load = [os.getloadavg()]
    for _ in range(args.repeats):
        for name, path in variants.items():
            for b in (1, 4):
                rows[name]["tps"][b].append(decode_tps(path, b))
    load.append(os.getloadavg())
    for r in rows.values():
        r["tps"] = {b: statistics.median(x) for b, x in r["tps"].items()}
    write(out, rows, load, args)


def write(out: Path, rows: dict[str, dict[str, Any]], load: list[Any], args: Any) -> None:
    """report.json, report.md (the table) and size_vs_kl.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fp32 = rows["fp32"]["tps"]
    lines = [
        f"eval model {args.model}, held-out tokens {args.tokens}, reference: fp32 export; "
        f"onnxruntime target; decode tok/s median of {args.repeats} round-robin repeats, 2 "
        f"threads; load average before {load[0][0]:.1f}, after {load[-1][0]:.1f} (2 cores, "
        "shared). 2:4 weights are stored dense here: no CPU kernel runs them faster; "
        "GPU speed not measured.",
        "",
        "| method | weight MiB | ppl | mean KL | top-1 | greedy@64 | tok/s b1 | tok/s b4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['weight_bytes'] / MIB:.2f} | {r['perplexity']:.3f} | "
            f"{r['kl_mean']:.2e} | {r['top1']:.4f} | {r['greedy64']:.3f} | "
            f"{r['tps'][1]:.0f} ({r['tps'][1] / fp32[1]:.2f}x) | "
            f"{r['tps'][4]:.0f} ({r['tps'][4] / fp32[4]:.2f}x) |"
        )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"rows": rows, "load": load}, indent=2))
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in rows.items():
        kl = max(r["kl_mean"], 1e-7)
        ax.scatter(r["weight_bytes"] / MIB, kl)
        ax.annotate(name, (r["weight_bytes"] / MIB, kl), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("weight MiB (ONNX initializers)")
    ax.set_ylabel("mean KL vs fp32 on held-out text (nats; fp32 plotted at 1e-7)")
    ax.set_title("kiln compression methods on the eval model")
    fig.tight_layout()
    fig.savefig(out / "size_vs_kl.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
