"""What `kiln tune` writes: tune.json, the chosen recipe, report.md and pareto.png."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.artifacts import tool_versions, write_json_atomic
from kiln.tune.choose import pareto

if TYPE_CHECKING:
    from kiln.tune.search import Search, Trial

log = logging.getLogger(__name__)

KIND, FORMAT = "kiln.tune", 1


def trial_record(t: Trial) -> dict[str, Any]:
    """One candidate in tune.json."""
    return {
        "key": t.candidate.key,
        "recipe": t.candidate.as_dict(),
        "status": t.status,
        "rule": t.rule,
        "reason": t.reason,
        "artifact": t.artifact,
        "optimize": asdict(t.optimize) if t.optimize is not None else None,
        "proxy": t.proxy,
        "full": t.full,
        "speed": t.speed,
        "build": t.build,
        "deficit": t.deficit,
        "time_s": round(t.elapsed_s, 3),
    }


def write_tune_json(s: Search, path: Path, summary: dict[str, Any]) -> None:
    """tune.json: inputs, protocol, every candidate, the choice."""
    write_json_atomic(
        path,
        {
            "kind": KIND,
            "format": FORMAT,
            "model": str(s.model),
            "target": s.ctx.target.name,
            "budget": asdict(s.recipe.budget),
            "workload": asdict(s.recipe.workload),
            "protocol": {"proxy": asdict(s.proxy), "full": asdict(s.full), "text": str(s.text)},
            "load_average": list(os.getloadavg()),
            "versions": tool_versions("onnxruntime", "tensorrt-rtx"),
            **summary,
            "baseline": s.baseline,
            "candidates": [trial_record(t) for t in s.trials],
        },
    )


def _metric(t: Trial, name: str) -> Any:
    src = t.full or t.proxy
    return None if src is None else src.get(name)


def _row(t: Trial) -> str:
    def f(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    sp = t.speed or {}
    spread = f"{sp['min']:.1f}..{sp['max']:.1f}" if "min" in sp else ""
    why = f"{t.rule}: {t.reason}" if t.rule else ""
    return (
        f"| {t.candidate.label()} | {t.status} | {f(_metric(t, 'kl_mean'), '.2e')} "
        f"| {f(_metric(t, 'top1_agreement'), '.3f')} | {f(_metric(t, 'greedy_agreement'), '.3f')} "
        f"| {f(_metric(t, 'ppl_increase'), '+.2%')} | {f(sp.get('tokens_per_s'), '.1f')} {spread} "
        f"| {t.elapsed_s:.1f} | {why[:160]} |"
    )


def write_markdown(s: Search, path: Path, summary: dict[str, Any], chart: Path | None) -> None:
    """report.md: the choice, the rung counts, the rank agreement and every candidate."""
    measured = s.ctx.target.is_cpu or s.measure
    speed = (
        "tokens/s measured (median, min..max)"
        if measured
        else "tokens/s by cost model (measured: false)"
    )
    lines = [
        f"# kiln tune: {s.model} on {s.ctx.target.name}",
        "",
        f"- budget: {asdict(s.recipe.budget)}",
        f"- workload: {asdict(s.recipe.workload)}",
        f"- chosen: {summary['chosen_label'] or 'nothing meets the budget'}",
        f"- fp32 export: {s.baseline.get('tokens_per_s', 0):.1f} tokens/s; chosen / fp32 per "
        f"repeat: {summary['speedup_vs_fp32'] or '-'}",
        f"- counts: {summary['counts']}",
        f"- proxy-to-full rank agreement of KL: {summary['rank_agreement']}",
        f"- trials: {summary['trials']['computed']} computed, {summary['trials']['reused']} reused",
        f"- wall time {summary['wall_s']:.1f} s, load average {os.getloadavg()}",
        "",
    ]
    if chart is not None:
        lines += [f"![Pareto front]({chart.name})", ""]
    lines += [
        f"| candidate | status | KL | top-1 | greedy | ppl | {speed} | s | rule / reason |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"chosen": 0, "accepted": 1, "rejected": 2, "pruned": 3}
    lines += [
        _row(t)
        for t in sorted(s.trials, key=lambda t: (order.get(t.status, 4), t.candidate.label()))
    ]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)


def write_chart(s: Search, path: Path) -> Path | None:
    """pareto.png: speed against KL for every measured candidate; the front and the choice."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (the dev extra): no %s", path.name)
        return None
    pts = [t for t in s.trials if t.speed and (t.full or t.proxy)]
    if not pts:
        return None
    xy = [(t.speed["tokens_per_s"], max(_metric(t, "kl_mean"), 1e-12)) for t in pts]  # type: ignore[index]
    front = sorted(pareto(xy), key=lambda i: xy[i][0])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for status, color in (
        ("accepted", "tab:blue"),
        ("rejected", "tab:gray"),
        ("chosen", "tab:red"),
    ):
        sel = [i for i, t in enumerate(pts) if t.status == status]
        if sel:
            star = status == "chosen"
            xs, ys = [xy[i][0] for i in sel], [xy[i][1] for i in sel]
            ax.scatter(
                xs, ys, c=color, label=status, marker="*" if star else "o", s=120 if star else 30
            )
    ax.plot([xy[i][0] for i in front], [xy[i][1] for i in front], "k--", lw=1, label="Pareto front")
    if s.baseline.get("tokens_per_s"):
        ax.axvline(s.baseline["tokens_per_s"], color="tab:green", lw=1, label="fp32 export")
    ax.axhline(s.recipe.budget.max_kl_mean, color="tab:orange", lw=1, label="KL budget")
    ax.set_yscale("log")
    measured = s.ctx.target.is_cpu or s.measure
    ax.set_xlabel("decode tokens/s" + ("" if measured else " (cost model, measured: false)"))
    ax.set_ylabel("mean KL vs fp32 (nats)")
    ax.set_title(f"kiln tune {Path(s.model).name} on {s.ctx.target.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return path
