"""What `make bench` prints and draws: the runner table, the target ratios, the profile, a chart.

Everything here reads the results dict that bench/race.py collects (one entry per model, one
per runner inside); nothing is measured here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Runner:
    """A runner of the race: the worker kind that runs it, its precision, its table label."""

    kind: str  # bench/race_runners.py worker: kiln, hf, genai, llamacpp
    precision: str  # fp32, int8 or int4 (Q8_0 / Q4_0 count as int8 / int4)
    label: str


RUNNERS = {
    "kiln": Runner("kiln", "fp32", "kiln concat fp32"),
    "kiln-ort": Runner("kiln", "fp32", "kiln concat fp32 ort"),
    "kiln-static": Runner("kiln", "fp32", "kiln static fp32"),
    "kiln-static-int8": Runner("kiln", "int8", "kiln static int8"),
    "kiln-static-int4": Runner("kiln", "int4", "kiln static int4"),
    "hf": Runner("hf", "fp32", "transformers eager"),
    "genai": Runner("genai", "fp32", "ort-genai fp32"),
    "genai-int8": Runner("genai", "int8", "ort-genai int8"),
    "genai-int4": Runner("genai", "int4", "ort-genai int4"),
    "llamacpp-f32": Runner("llamacpp", "fp32", "llama.cpp F32"),
    "llamacpp-q8_0": Runner("llamacpp", "int8", "llama.cpp Q8_0"),
    "llamacpp-q4_0": Runner("llamacpp", "int4", "llama.cpp Q4_0"),
}
GENAI_AT = {"fp32": "genai", "int8": "genai-int8", "int4": "genai-int4"}
BITS = {"fp32": 32, "int8": 8, "int4": 4}


@dataclass(frozen=True)
class Bar:
    """One issue-7 ratio: runner a's figure over runner b's, at least `need`."""

    what: str
    a: str
    b: str
    metric: str  # "b1", "b4" (decode tok/s at that batch) or "ttft" (b's TTFT / a's)
    need: float


BARS = (
    Bar("b1 fp32 static vs genai fp32", "kiln-static", "genai", "b1", 1.3),
    Bar("b1 fp32 static vs eager", "kiln-static", "hf", "b1", 3.0),
    Bar("b1 int4 static vs genai int4", "kiln-static-int4", "genai-int4", "b1", 1.0),
    Bar("b1 int4 static vs genai int4 (stretch)", "kiln-static-int4", "genai-int4", "b1", 1.5),
    Bar("b4 fp32 static vs genai fp32", "kiln-static", "genai", "b4", 1.0),
    Bar("b4 int4 static vs genai int4", "kiln-static-int4", "genai-int4", "b4", 1.0),
    Bar("TTFT fp32 static vs genai fp32", "kiln-static", "genai", "ttft", 1.0),
    Bar("TTFT int4 static vs genai int4", "kiln-static-int4", "genai-int4", "ttft", 1.0),
    Bar("b1 fp32 concat vs eager", "kiln", "hf", "b1", 2.5),
    Bar("b1 fp32 concat, ORT target, vs eager", "kiln-ort", "hf", "b1", 2.5),
)


def _short(why: str, width: int = 150) -> str:
    """First line of a reason, cut to fit a table row (bench.json keeps it whole)."""
    line = why.strip().splitlines()[0] if why.strip() else why
    return line if len(line) <= width else line[: width - 3] + "..."


def _figure(d: dict[str, Any], metric: str) -> float | None:
    batches = d.get("batches", {})
    if metric == "ttft":
        first = next(iter(batches.values()), None)
        return first["ttft_s"] if first else None
    got = batches.get(metric[1:])
    return got["decode_tok_s"] if got else None


def ratios(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target ratio per model: the ratio and met / not met (or why it has no figure)."""
    out = []
    for model, res in results.items():
        runners = res["runners"]
        for bar in BARS:
            a, b = (_figure(runners.get(r, {}), bar.metric) for r in (bar.a, bar.b))
            row = {"model": model, "what": bar.what, "need": bar.need}
            if a is None or b is None:
                missing = bar.a if a is None else bar.b
                why = _short(runners.get(missing, {}).get("skipped", "not run"))
                out.append({**row, "ratio": None, "status": f"n/a ({missing}: {why})"})
                continue
            ratio = b / a if bar.metric == "ttft" else a / b
            out.append({**row, "ratio": ratio, "status": "met" if ratio >= bar.need else "not met"})
    return out


def ratios_text(rows: list[dict[str, Any]]) -> str:
    """Issue 7's bars, one line each."""
    lines = []
    for r in rows:
        got = f"{r['ratio']:5.2f}x" if r["ratio"] is not None else "  n/a "
        lines.append(f"{r['model']:<7} {r['what']:<40} {got}  (need >= {r['need']:.1f}x)  "
                     f"{r['status']}")  # fmt: skip
    return "\n".join(lines)


def _ratio(mine: dict, ref: dict | None, batch: str, key: str, inverse: bool = False) -> str:
    """A median figure over the reference's (the inverse with `inverse`), or n/a without one."""
    if not ref:
        return "n/a"
    x, y = mine[batch][key], ref[batch][key]
    return f"{(y / x if inverse else x / y):.2f}x"


def _spread(row: dict[str, Any], key: str) -> str:
    """Half the min-max range over repeats, as a share of the median."""
    lo, hi = row.get(key + "_spread", (row[key], row[key]))
    return f"±{(hi - lo) / 2 / row[key]:.0%}" if row[key] else ""


def settings_short(r: str, s: dict[str, Any]) -> str:
    """One table cell: threads, spinning, provider, batching."""
    kind = RUNNERS[r].kind
    if kind in ("kiln", "genai"):
        spin = "spin" if s.get("session.intra_op.allow_spinning") == "1" else "no spin"
        batch = "B slots" if kind == "kiln" else "batch_size=B"
        return f"{s['intra_op_num_threads']} thr, {spin}, CPU EP, {batch}"
    if kind == "hf":
        return f"{s['torch.set_num_threads']} thr, OMP wait default, {s['attention']}"
    fa = {-1: "auto", 0: "off", 1: "on"}.get(s.get("flash_attn_type"), "?")
    return f"{s['n_threads']}/{s['n_threads_batch']} thr, OMP, fa {fa}, B seqs/ctx"


def roofline(res: dict[str, Any], precision: str, batch: int) -> float:
    """Weight-streaming bound on decode tok/s: weight bytes at `precision` once per step."""
    return res["roofline_tok_s_b1"] * 32 / BITS[precision] * batch


def table(
    results: dict[str, Any],
    bw: float,
    batches: list[int],
    runners: list[str],
    conditions: dict[str, Any],
) -> str:
    """One row per model and runner, then the conditions and every runner's settings in full.

    Medians over the round-robin repeats with their spread, the ratios to eager (fp32) and to
    genai at the same precision, the roofline share.
    """
    b1, bn = str(batches[0]), str(batches[-1])
    head = (f"{'model':<7} {'runner':<21} {'prec':<5} {'settings':<40} {'TTFT ms':>12} "
            + " ".join(f"{'tok/s b' + str(b):>13}" for b in batches)
            + f" {'b1/eager':>8} {'b1/genai':>8} {'b' + bn + '/genai':>8} {'TTFT g/x':>8}"
            f" {'roof b1':>7} {'peak MiB':>8} {'agree':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    details = []
    for model, res in results.items():
        runs = res["runners"]
        hf = runs.get("hf", {}).get("batches")
        for r in runners:
            d = runs.get(r, {})
            spec = RUNNERS[r]
            if "batches" not in d:
                why = _short(d.get("skipped", "not run"))
                lines.append(f"{model:<7} {spec.label:<21} {spec.precision:<5} n/a: {why}")
                continue
            b = d["batches"]
            g = runs.get(GENAI_AT[spec.precision], {}).get("batches")

            toks = " ".join(
                f"{b[str(x)]['decode_tok_s']:7.1f} {_spread(b[str(x)], 'decode_tok_s'):>5}"
                for x in batches
            )
            ttft = f"{b[b1]['ttft_s'] * 1e3:6.0f} {_spread(b[b1], 'ttft_s'):>5}"
            agree = "n/a"
            if hf and d.get("tokens") and runs["hf"].get("tokens"):
                same = np.array(d["tokens"]) == np.array(runs["hf"]["tokens"])
                agree = f"{np.mean(same):.0%}"
            roof = b[b1]["decode_tok_s"] / roofline(res, spec.precision, int(b1))
            peak = d.get("peak_rss_mib")
            ttft_vs = _ratio(b, g, b1, "ttft_s", inverse=True)
            lines.append(
                f"{model:<7} {spec.label:<21} {spec.precision:<5} "
                f"{settings_short(r, d['settings']):<40} {ttft:>12} {toks} "
                f"{_ratio(b, hf, b1, 'decode_tok_s'):>8} {_ratio(b, g, b1, 'decode_tok_s'):>8} "
                f"{_ratio(b, g, bn, 'decode_tok_s'):>8} {ttft_vs:>8} "
                f"{roof:7.0%} {peak if peak is None else round(peak)!s:>8} {agree:>6}"
            )
            details.append(f"  {model} / {spec.label}: {d['artifact_note']}; "
                           + ", ".join(f"{k}={v}" for k, v in d["settings"].items()
                                       if k != "system_info"))  # fmt: skip
    c = conditions
    lines += [
        "",
        f"{c['prompt']}-token prompt, {c['new']} new tokens (min = max), {c['threads']} intra-op "
        f"threads for every runner, spin {c['spin']} (ONNX Runtime allow_spinning: kiln, genai); "
        f"median of {c['repeats']} round-robin repeats, ± = half the min-max range. TTFT and "
        "decode tok/s come from one streamed call: TTFT to the first token, decode from it to "
        "the last. "
        f"1/5/15-min load average at start {_load(c['load_start'])}, at end "
        f"{_load(c['load_end'])} on {c['cores']} cores.",
        "b1/eager = decode tok/s at batch 1 over transformers eager fp32's; b1/genai, "
        f"b{bn}/genai = over ort-genai's at the same precision; TTFT g/x = genai's TTFT over the "
        "runner's (>1: the runner answers first). 'roof b1' = batch-1 decode over the weight-"
        f"streaming roofline at the runner's precision (fp32 weight bytes per step x bits/32, "
        f"scales not counted, at {bw:.1f} GB/s measured numpy matrix-vector bandwidth, same run). "
        "'agree' = row-0 greedy tokens equal to eager's (quantized rows differ by design: "
        "random weights).",
        "settings in full:",
        *details,
    ]
    return "\n".join(lines)


def _load(avg: Any) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def profile_text(results: dict[str, Any]) -> str:
    """Where each profiled kiln runner's decode time goes, per model."""
    out = []
    for model, res in results.items():
        for runner, p in res.get("profiles", {}).items():
            if "skipped" in p:
                out.append(f"{model} / {runner}: n/a ({p['skipped']})")
                continue
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in p["ops"][:8])
            loop = p["loop_overhead_s"] / p["wall_s"]
            kv = p["kv_bytes_copied_per_step_mean"] / 1e6
            out.append(
                f"{model} / {runner}: graph {p['graph_s']:.2f} s of {p['wall_s']:.2f} s wall "
                f"(loop/Python {loop:.1%}); decode step {p['decode_graph_ms_per_step']:.1f} ms in "
                f"ORT; KV bytes copied per step {kv:.2f} MB ({p['kv_copy_measure']}); ops by "
                f"time: {ops}"
            )
    return "\n".join(out)


def chart(
    results: dict[str, Any], batches: list[int], runners: list[str], bw: float, path: Path
) -> None:
    """Decode tokens/s per batch size and TTFT per runner, one row of panels per model.

    The weight-streaming roofline of each precision is drawn on the tok/s panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    cols = len(batches)
    fig, axes = plt.subplots(2 * len(models), cols, figsize=(7 * cols, 9 * len(models)),
                             squeeze=False)  # fmt: skip
    colors = {"kiln": "tab:blue", "hf": "tab:gray", "genai": "tab:orange", "llamacpp": "tab:green"}
    hatch = {"fp32": "", "int8": "//", "int4": "xx"}
    for i, model in enumerate(models):
        res = results[model]
        ran = [r for r in runners if "batches" in res["runners"].get(r, {})]
        xs = np.arange(len(ran))
        for j, (key, b) in enumerate((k, b) for k in ("decode_tok_s", "ttft_s") for b in batches):
            ax = axes[2 * i + j // cols][j % cols]
            rows = [res["runners"][r]["batches"][str(b)] for r in ran]
            scale = 1.0 if key == "decode_tok_s" else 1e3
            med = np.array([row[key] for row in rows]) * scale
            lo = med - np.array([row[key + "_spread"][0] for row in rows]) * scale
            hi = np.array([row[key + "_spread"][1] for row in rows]) * scale - med
            ax.bar(xs, med, yerr=[lo, hi], capsize=3,
                   color=[colors[RUNNERS[r].kind] for r in ran],
                   hatch=[hatch[RUNNERS[r].precision] for r in ran], edgecolor="black")  # fmt: skip
            ax.set_xticks(xs, [RUNNERS[r].label for r in ran], rotation=60, ha="right", fontsize=8)
            if key == "decode_tok_s":
                ax.set_title(f"{model}: decode tokens/s, batch {b} (higher is better)")
                for prec, style in (("fp32", "-"), ("int8", "--"), ("int4", ":")):
                    if any(RUNNERS[r].precision == prec for r in ran):
                        label = f"{prec} weight-streaming roofline"
                        ax.axhline(roofline(res, prec, b), color="red", linestyle=style,
                                   linewidth=1, label=label)  # fmt: skip
                top = max(med.max() * 1.3, 1)
                ax.set_ylim(0, top)
                ax.legend(fontsize=7, loc="upper left")
            else:
                ax.set_title(f"{model}: time to first token, ms, batch {b} (lower is better)")
    fig.text(0.01, 0.005, f"roofline: weight bytes per decode step at the precision's bits, at "
             f"{bw:.1f} GB/s measured matrix-vector bandwidth; lines above the axis are cut. "
             "Error bars: min-max over round-robin repeats.", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
