"""`make compress-report`: every compression method on each model set, one table each and a chart.

Each method makes an onnxruntime-target artifact from the same fp32 export; `kiln eval` scores
it against the fp32 export (perplexity, mean KL, top-1, greedy agreement over 64 tokens), and
CPU decode tok/s at batch 1 and 4 is timed round-robin over all of a set's artifacts, fp32 first
in every round, same threads (so they share the machine's noise; load average recorded).
Calibration text is the eval corpus's training split (models/train_eval.py), never held out.

Model sets (`--models`):
- eval: the eval model (models/eval-llama), held-out text; every method, and the pruning curve
  (10/20/30% of decoder layers, of MLP channels, and of KV groups when it has more than one);
- smollm: the SmolLM-135M shape (bench/race.py, seeded random weights) for size and CPU speed;
  KL/top-1 against its fp32 on stdlib text (perplexity of random weights means nothing), with
  fewer calibration windows (`--smollm-windows`) to keep GPTQ over 30 layers bounded.
Writes OUT/report.md, OUT/report.json and OUT/size_vs_kl.png (each file to a temp name first).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("compress-report")
MODEL = Path("models/eval-llama")
MIB = 2**20
FRACTIONS = (0.1, 0.2, 0.3)
CURVES = ("prune-layers", "prune-mlp", "prune-kv")
EVAL_METHODS = ("int8-rtn", "int4-rtn", "int4-gptq", "mixed", "sparse24", "sparse24-calibrated")
SMOLLM_METHODS = ("int8-rtn", "int4-rtn", "int4-gptq", "mixed", "sparse24", "prune-mlp20")


@dataclass
class ModelSet:
    """One model's share of the report: its folder, text, methods and calibration size."""

    name: str
    hf: Path
    text: Path  # scored text (held-out for the eval model)
    methods: list[str]  # labels besides fp32 (prune-<what><percent> included)
    tokens: int  # scored tokens of `text`
    sequences: int = 16  # calibration windows (and as many gate windows)
    length: int = 256
    note: str = ""


def weight_bytes(onnx_path: Path) -> int:
    """Bytes of the graph's initializers (the weights it stores)."""
    import onnx

    proto = onnx.load(str(onnx_path))
    return sum(
        len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in proto.graph.initializer
    )


def prune_labels(config: dict[str, Any], fractions: tuple[float, ...] = FRACTIONS) -> list[str]:
    """The pruning curve's labels: layers and MLP channels, KV groups when there are several."""
    curves = ["prune-layers", "prune-mlp"]
    if config.get("num_key_value_heads", config["num_attention_heads"]) > 1:
        curves.append("prune-kv")
    return [f"{c}{round(f * 100)}" for c in curves for f in fractions]


def prune_cut(label: str, config: dict[str, Any]) -> tuple[Any, str, int, str]:
    """(PruneSpec, what is cut in words, units cut, percent) of a `prune-<what><percent>`."""
    from kiln.compress import PruneSpec

    for curve, field, key, unit in (
        ("prune-layers", "layers", "num_hidden_layers", "layers"),
        ("prune-mlp", "mlp", "intermediate_size", "MLP channels"),
        ("prune-kv", "kv_groups", "num_key_value_heads", "KV groups"),
    ):
        if label.startswith(curve):
            pct = label[len(curve) :]
            total = config.get(key, config["num_attention_heads"])
            cut = round(int(pct) / 100 * total)  # the rounding compress/prune.py applies
            return PruneSpec(**{field: int(pct) / 100}), f"{cut} of {total} {unit}", cut, pct
    raise ValueError(f"not a pruning label: {label}")


def make_variants(ms: ModelSet, out: Path, calib: Path, export: Path) -> dict[str, dict[str, Any]]:
    """Each method's onnxruntime-target artifact: {label: {path, made_s, title, ...}}.

    A rerun keeps finished folders (made_s is then the first run's). Pruning labels whose cut
    rounds to nothing get no row; one that cuts as much as an earlier one joins its title.
    """
    from kiln.compress import prune_model
    from kiln.export import export_model
    from kiln.optimize import optimize_model
    from kiln.optimize.methods import compress_artifact

    config = json.loads((ms.hf / "config.json").read_text())
    v: dict[str, dict[str, Any]] = {}
    windows = {"sequences": ms.sequences, "length": ms.length}

    def make(label: str, build: Callable[[], Any], **extra: Any) -> None:
        stamp = out / label / "made_s.json"
        if not (out / label / "optimize.json").is_file():
            t0 = time.perf_counter()
            build()
            stamp.write_text(json.dumps(round(time.perf_counter() - t0, 1)))
            log.info("%s/%s made in %s s", ms.name, label, stamp.read_text())
        made = json.loads(stamp.read_text()) if stamp.is_file() else None
        v[label] = {"path": out / label, "made_s": made, "title": label, **extra}

    def compress(method: str, label: str, **kw: Any) -> None:
        compress_artifact(export, out / label, method=method, calibration=calib,
                          target="onnxruntime", **windows, **kw)  # fmt: skip

    def pruned(label: str, spec: Any) -> None:
        hf = out / f"{label}-hf"
        if not (hf / "prune.json").is_file():
            rec = prune_model(ms.hf, hf, calibration=calib, spec=spec,
                              sequences=ms.sequences, length=ms.length)  # fmt: skip
            log.info("%s: gate %s", label, rec["gate"])
        onnx = export_model(hf, out / f"{label}-onnx", precision="fp32")
        optimize_model(onnx, out / label, target="onnxruntime", precision="fp32",
                       allow_drift=True, check_torch=False)  # fmt: skip

    make("fp32", partial(make_rtn, export, out, "fp32"))
    for label, precision in (("int8-rtn", "int8"), ("int4-rtn", "int4")):
        if label in ms.methods:
            make(label, partial(make_rtn, export, out, precision))
    for label, method in (
        ("int4-gptq", "gptq-int4"),
        ("sparse24", "sparse24"),
        ("sparse24-calibrated", "sparse24-calibrated"),
    ):
        if label in ms.methods:
            make(label, partial(compress, method, label))
    if "mixed" in ms.methods:
        # the budget halfway between uniform int4 and int8 of this model (both made for it)
        sizes = [weight_bytes(make_rtn(export, out, p) / "model.onnx") for p in ("int4", "int8")]
        budget = round(sum(sizes) / 2 / MIB, 2)
        make("mixed", partial(compress, "mixed", "mixed", weight_budget_mib=budget),
             title=f"mixed @{budget} MiB", budget_mib=budget)  # fmt: skip
    for label in ms.methods:
        if not label.startswith(CURVES):
            continue
        spec, words, n, pct = prune_cut(label, config)
        same = [k for k, r in v.items() if r.get("cut") == words]
        if n == 0:
            log.info("%s: %s rounds to nothing cut; no row", label, words)
        elif same:
            log.info("%s: %s, the same cut as %s; no row", label, words, same[0])
            v[same[0]]["title"] += f", also {pct}%"
        else:
            make(label, partial(pruned, label, spec), cut=words, title=f"{label} ({words})")
    return v


def make_rtn(export: Path, out: Path, precision: str) -> Path:
    """The fp32 or uniform round-to-nearest artifact (the mixed budget's bounds), made once."""
    from kiln.optimize import optimize_model

    path = out / ("fp32" if precision == "fp32" else f"{precision}-rtn")
    if not (path / "optimize.json").is_file():
        optimize_model(export, path, target="onnxruntime", precision=precision,
                       allow_drift=True, check_torch=False)  # fmt: skip
    return path


def decode_tps(onnx_dir: Path, batch: int, steps: int = 32, threads: int = 2) -> float:
    """Decode tokens/s, batch `batch`, greedy, one token per call, after a 16-token prefill.

    Two untimed steps first: the session's first runs allocate and are not decode speed.
    """
    from kiln.graph_io import stepper

    run = stepper(onnx_dir / "model.onnx", rows=batch, threads=threads)
    run.reset(batch)
    ids = np.random.default_rng(0).integers(3, 1000, (batch, 16), np.int64)
    logits = run.append(ids, 0)
    t0 = 0.0
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        nxt = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        logits = run.append(nxt, 16 + i)
    return batch * steps / (time.perf_counter() - t0)


def model_sets(args: argparse.Namespace, work: Path) -> list[ModelSet]:
    """The sets `--models` names, with the methods `--methods` keeps (fp32 always)."""
    sets = []
    for name in args.models.split(","):
        if name == "eval":
            cfg = json.loads((args.model / "config.json").read_text())
            methods = [*EVAL_METHODS, *prune_labels(cfg)]
            ms = ModelSet("eval", args.model, args.model / "heldout.txt", methods, args.tokens,
                          note=f"eval model {args.model}, held-out text")  # fmt: skip
        elif name == "smollm":
            from bench.race import make_model

            hf = make_model("smollm", work / "smollm-hf")
            ms = ModelSet("smollm", hf, args.model / "heldout.txt", list(SMOLLM_METHODS),
                          args.smollm_tokens, sequences=args.smollm_windows, length=128,
                          note="SmolLM-135M shape, seeded random weights (bench/race.py); "
                          "stdlib held-out text as tokens: perplexity of random weights "
                          "means nothing, KL/top-1 vs its fp32 do")  # fmt: skip
        else:
            raise SystemExit(f"--models: unknown set {name!r} (eval, smollm)")
        if args.methods:
            keep = set(args.methods.split(","))
            ms.methods = [m for m in ms.methods if m in keep]
        sets.append(ms)
    return sets


def run_set(ms: ModelSet, out: Path, calib: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Make, score and time one model set's artifacts; its rows and settings."""
    from kiln.evaluate import EvalOptions, evaluate_model
    from kiln.export import export_model

    export = export_model(ms.hf, out / "export-fp32", precision="fp32")
    variants = make_variants(ms, out, calib, export)
    rows: dict[str, dict[str, Any]] = {}
    for name, var in variants.items():
        rep = evaluate_model(var["path"], reference=export, text=ms.text, out=out / "eval" / name,
                             options=EvalOptions(tokens=ms.tokens))  # fmt: skip
        r = rep.results
        rows[name] = {
            "label": var["title"],
            "weight_bytes": weight_bytes(var["path"] / "model.onnx"),
            "perplexity": r["perplexity"],
            "kl_mean": r["kl_mean"],
            "top1": r["top1_agreement"],
            "greedy64": r["greedy_agreement"],
            "made_s": var["made_s"],
            "tps": {1: [], 4: []},
        }
    load = [os.getloadavg()]
    for rep_i in range(args.repeats):
        for name, var in variants.items():  # fp32 first in every round
            for b in (1, 4):
                rows[name]["tps"][b].append(decode_tps(var["path"], b, args.steps, args.threads))
        log.info("%s: timing round %d/%d done", ms.name, rep_i + 1, args.repeats)
    load.append(os.getloadavg())
    for r in rows.values():
        r["tps"] = {b: statistics.median(x) for b, x in r["tps"].items()}
    return {"note": ms.note, "tokens": ms.tokens, "windows": [ms.sequences, ms.length],
            "load": load, "rows": rows}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Make the variants, score them, time them interleaved, write the tables and the chart."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("out/compress"))
    ap.add_argument("--model", type=Path, default=MODEL, help="the eval model folder")
    ap.add_argument("--models", default="eval", help="model sets, comma-separated: eval,smollm")
    ap.add_argument("--methods", default="", help="only these labels (smoke), e.g. int4-rtn")
    ap.add_argument("--tokens", type=int, default=8192, help="scored tokens (eval set)")
    ap.add_argument("--smollm-tokens", type=int, default=2048, help="scored tokens (smollm)")
    ap.add_argument("--smollm-windows", type=int, default=4, help="calibration windows, smollm")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin timing repeats")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    ap.add_argument("--threads", type=int, default=2, help="ORT intra-op threads when timing")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
    from kiln.models.train_eval import calibration_text

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    calib = calibration_text(out / "calibration.txt")
    report: dict[str, Any] = {}
    for ms in model_sets(args, out):
        report[ms.name] = run_set(ms, out if ms.name == "eval" else out / ms.name, calib, args)
    write(out, report, args)


def table(name: str, s: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """One model set's markdown section."""
    rows, load = s["rows"], s["load"]
    fp32 = rows["fp32"]["tps"]
    lines = [
        f"## {name}",
        "",
        f"{s['note']}; scored tokens {s['tokens']}; reference: its fp32 export; "
        "onnxruntime target; "
        f"calibration {s['windows'][0]} windows of {s['windows'][1]} tokens (and as many gate "
        f"windows) from the training split; decode tok/s median of {args.repeats} round-robin "
        f"repeats (fp32 first each round), {args.steps} steps, {args.threads} threads; load "
        f"average before {load[0][0]:.1f}, after {load[-1][0]:.1f}. 2:4 weights are stored dense "
        "here (no CPU kernel runs them faster): their GPU speed is not measured. 'made s' is "
        "the time to make the artifact (calibration, GPTQ, pruning + export).",
        "",
        "| method | weight MiB | ppl | mean KL | top-1 | greedy@64 | tok/s b1 | tok/s b4 "
        "| made s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        lines.append(
            f"| {r['label']} | {r['weight_bytes'] / MIB:.2f} | {r['perplexity']:.3f} | "
            f"{r['kl_mean']:.2e} | {r['top1']:.4f} | {r['greedy64']:.3f} | "
            f"{r['tps'][1]:.0f} ({r['tps'][1] / fp32[1]:.2f}x) | "
            f"{r['tps'][4]:.0f} ({r['tps'][4] / fp32[4]:.2f}x) | {r['made_s']} |"
        )
    return [*lines, ""]


def write(out: Path, report: dict[str, Any], args: argparse.Namespace) -> None:
    """report.json, report.md (a table per set) and size_vs_kl.png, each via a temp name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["# Compression methods: size, quality and CPU decode speed", ""]
    for name, s in report.items():
        lines += table(name, s, args)
    _atomic(out / "report.md", "\n".join(lines))
    _atomic(out / "report.json", json.dumps(report, indent=2, default=str))
    fig, axes = plt.subplots(len(report), 2, figsize=(13, 5 * len(report)), squeeze=False)
    for (name, s), (ax_size, ax_tps) in zip(report.items(), axes, strict=True):
        plot(
            ax_size, s["rows"], lambda r: r["weight_bytes"] / MIB, "weight MiB (ONNX initializers)"
        )
        plot(ax_tps, s["rows"], lambda r: r["tps"][1], "CPU decode tok/s, batch 1")
        ax_size.set_title(f"{name}: size vs mean KL to fp32 (fp32 plotted at 1e-7)")
        ax_tps.set_title(f"{name}: batch-1 decode speed vs mean KL to fp32")
    fig.tight_layout()
    tmp = out / ".size_vs_kl.tmp.png"
    fig.savefig(tmp, dpi=110)
    tmp.replace(out / "size_vs_kl.png")
    print("\n".join(lines))


def plot(ax: Any, rows: dict[str, dict[str, Any]], x: Callable[[dict[str, Any]], float],
         xlabel: str) -> None:  # fmt: skip
    """Every method as a point, each pruning curve as a line from fp32 through its sizes."""
    kl = {n: max(r["kl_mean"], 1e-7) for n, r in rows.items()}
    for n, r in rows.items():
        ax.scatter(x(r), kl[n], s=14)
        ax.annotate(n, (x(r), kl[n]), fontsize=7)
    for curve in CURVES:
        names = ["fp32", *(n for n in rows if n.startswith(curve))]
        if len(names) > 1:
            ax.plot([x(rows[n]) for n in names], [kl[n] for n in names], "--", lw=1, label=curve)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean KL vs fp32 (nats)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
