"""What `make bench` prints and draws: the runner table, the target ratios, the profile, a chart.

Everything here reads the results dict that bench/race.py collects (one entry per model, one
per runner inside); nothing is measured here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

LABELS = {
    "kiln": "kiln concat fp32",
    "kiln-ort": "kiln concat fp32 ort",
    "kiln-static": "kiln static fp32",
    "kiln-static-int4": "kiln static int4",
    "hf": "transformers eager",
    "genai": "ort-genai fp32",
    "genai-int4": "ort-genai int4",
}


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


def table(results: dict[str, Any], bw: float, batches: list[int], runners: list[str]) -> str:
    """One row per model and runner; ratios to transformers eager; roofline share at batch 1."""
    head = (f"{'model':<7} {'runner':<20} {'TTFT ms':>8} "
            + " ".join(f"{'tok/s b' + str(b):>10}" for b in batches)
            + f" {'vs HF b1':>8} {'TTFT vs HF':>10} {'roofline':>8} {'peak MiB':>8} "
            f"{'agree':>6}  artifact")  # fmt: skip
    lines = [head, "-" * len(head)]
    for model, res in results.items():
        hf = res["runners"].get("hf", {})
        for r in runners:
            d = res["runners"].get(r, {})
            if "batches" not in d:
                why = _short(d.get("skipped", "not run"))
                lines.append(f"{model:<7} {LABELS[r]:<20} n/a: {why}")
                continue
            b = d["batches"]
            tok = [b[str(x)]["decode_tok_s"] for x in batches]
            ttft = b[str(batches[0])]["ttft_s"]
            vs = ttft_vs = agree = "     n/a"
            if "batches" in hf:
                vs = f"{tok[0] / hf['batches'][str(batches[0])]['decode_tok_s']:7.2f}x"
                ttft_vs = f"{hf['batches'][str(batches[0])]['ttft_s'] / ttft:9.2f}x"
                agree = f"{np.mean(np.array(d['tokens']) == np.array(hf['tokens'])):6.0%}"
            roof = tok[0] / res["roofline_tok_s_b1"]
            lines.append(
                f"{model:<7} {LABELS[r]:<20} {ttft * 1e3:8.0f} "
                + " ".join(f"{t:10.1f}" for t in tok)
                + f" {vs:>8} {ttft_vs:>10} {roof:8.0%} {d['peak_rss_mib']:8.0f} {agree:>6}  "
                + d.get("artifact_note", "")
            )
    lines.append(
        f"roofline: fp32 weight bytes per decode step at {bw:.1f} GB/s measured matrix-vector "
        "bandwidth (numpy sgemv, same run); int4 rows against the same fp32 roofline (they read "
        "~1/6 of those bytes, so they may pass 100%). 'vs HF' = tokens/s ratio at batch 1, "
        "'TTFT vs HF' = HF TTFT / runner TTFT; 'agree' = row-0 greedy tokens equal to HF's "
        "(int4 rows are expected to differ: random weights, quantized)."
    )
    return "\n".join(lines)


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


def chart(results: dict[str, Any], batches: list[int], runners: list[str], path: Path) -> None:
    """Bar charts: decode tokens/s per batch size and TTFT, per model and runner."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4))
    width = 0.8 / len(runners)

    def figure(model: str, runner: str, batch: int, key: str) -> float:
        d = results[model]["runners"].get(runner, {}).get("batches", {}).get(str(batch), {})
        return float(d.get(key, 0))

    for k, r in enumerate(runners):
        xs = np.arange(len(models)) + k * width
        for j, b in enumerate(batches):
            axes[j].bar(xs, [figure(m, r, b, "decode_tok_s") for m in models], width,
                        label=LABELS[r])  # fmt: skip
            axes[j].set_title(f"decode tokens/s, batch {b} (higher is better)")
        ttft = [figure(m, r, batches[0], "ttft_s") * 1e3 for m in models]
        axes[-1].bar(xs, ttft, width, label=LABELS[r])
    axes[-1].set_title("time to first token, ms (lower is better)")
    for ax in axes:
        ax.set_xticks(np.arange(len(models)) + 0.4 - width / 2, models)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
