"""`kiln tune`: pick the recipe per model and target under a quality budget, with evidence.

Entry point `tune_model`: span the candidate space (tune/space.py knobs), drop hopeless
candidates by named rules (tune/rules.py), optimize and screen the rest on a proxy eval, give
survivors the full eval protocol (`kiln eval` against the fp32 export), time them on the CPU
through kiln's runtime or cost them for a GPU profile and build their engines, and choose
(tune/choose.py). Writes tune.json (every candidate and why), recipe.toml (the choice, which
`kiln optimize --recipe` and `kiln build --recipe` take), report.md and pareto.png. Every
step is a cached trial (tune/trials.py): a rerun with the same inputs computes nothing.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln.artifacts import sha256_file
from kiln.errors import ConfigError, KilnError
from kiln.evaluate import EvalOptions
from kiln.tune import make
from kiln.tune.choose import choose, closest, rank_agreement
from kiln.tune.recipe import BuildSection, ExportSection, Recipe, RuntimeSection, save_recipe
from kiln.tune.search import Search, Trial, context_for, run_search
from kiln.tune.space import target_named
from kiln.tune.speed import ratio_band

__all__ = ["NothingFitsError", "TuneResult", "tune_model"]

log = logging.getLogger(__name__)

TUNE_FILE, RECIPE_FILE, REPORT_FILE, CHART_FILE = (
    "tune.json",
    "recipe.toml",
    "report.md",
    "pareto.png",
)


class NothingFitsError(KilnError):
    """No candidate meets the budget; the message names the closest and its deficit."""


@dataclass(frozen=True)
class TuneResult:
    """What a tune found and where it wrote it."""

    out: Path
    trials: list[Trial]
    chosen: Trial | None
    summary: dict[str, Any]


def default_out(model: Path, target: str) -> Path:
    """out/tune/<model name>/<target>/."""
    return Path("out/tune") / Path(model).resolve().name / Path(target).stem


def default_calibration(model: Path, path: Path) -> Path | None:
    """For a model trained by models/train_eval.py (its split.json): its training-split text.

    Written at `path` once (models/train_eval.py `calibration_text`, as bench/compress_report.py
    uses); other models have no default (`--calibration FILE`).
    """
    split = Path(model) / "split.json"
    if not split.is_file() or json.loads(split.read_text()).get("corpus") != "python-stdlib":
        return None
    if not path.is_file():
        from kiln.models.train_eval import calibration_text

        calibration_text(path)
    return path


def _check_calibration(calibration: Path | None, heldout: Path) -> None:
    """Refuse to calibrate on the text the eval scores."""
    if calibration is None or not heldout.is_file():
        return
    if calibration.resolve() == heldout.resolve() or sha256_file(calibration) == sha256_file(
        heldout
    ):
        raise ConfigError(
            f"--calibration {calibration} is the eval text {heldout}: calibrating on held-out "
            "text would flatter the calibrated methods; give training text."
        )


def tune_model(
    model: Path,
    target: str,
    *,
    recipe: Recipe | None = None,
    out: Path | None = None,
    text: Path | None = None,
    repeats: int = 5,
    measure: bool = False,
    proxy: EvalOptions = make.PROXY,
    full: EvalOptions = make.FULL,
    calibration: Path | None = None,
) -> TuneResult:
    """Tune `model` (a Hugging Face folder) for `target` ("cpu" or a GPU profile).

    `calibration` is the text calibrated methods calibrate on (default: `default_calibration`);
    without one they are dropped by rule. Raises NothingFitsError (after writing every output)
    when no candidate meets the budget.
    """
    t0 = time.perf_counter()
    model = Path(model)
    tgt = target_named(target)
    if measure and tgt.is_cpu:
        raise KilnError(
            "--measure times GPU engines; cpu candidates are always measured (drop it)."
        )
    recipe = replace(recipe or Recipe(), target=tgt.name)
    out = Path(out) if out is not None else default_out(model, target)
    out.mkdir(parents=True, exist_ok=True)
    calibration = calibration or default_calibration(model, out.parent / "calibration.txt")
    if text is None and (model / "heldout.txt").is_file():
        text = model / "heldout.txt"  # a pruned model's folder has none: score every graph on it
    _check_calibration(calibration, text or model / "heldout.txt")
    ctx = context_for(model, tgt, recipe, calibration)
    s = Search(model, ctx, recipe, out, text, proxy, full, repeats, measure)
    run_search(s)
    chosen, ties = choose(s.trials, s.baseline)
    if chosen is not None:
        chosen.status = "chosen"
    summary = _summary(s, chosen, ties, time.perf_counter() - t0)
    _write(s, out, chosen, summary)
    log.info(
        "tune done in %.1f s: %d trials computed, %d reused -> %s",
        summary["wall_s"], len(s.store.computed), len(s.store.reused), out,
    )  # fmt: skip
    if chosen is None:
        near = closest(s.trials, recipe.budget)
        detail = (
            f"closest: {near.candidate.label()} ({near.rule}: {near.reason})"
            if near is not None
            else "no candidate reached an eval (see the rules in tune.json)"
        )
        raise NothingFitsError(
            f"no candidate of {model} on {tgt.name} meets the budget {recipe.budget}; {detail}. "
            f"Loosen the budget (--budget max_kl_mean=...) or widen [search]; every candidate "
            f"is in {out / TUNE_FILE}."
        )
    return TuneResult(out, s.trials, chosen, summary)


def _summary(s: Search, chosen: Trial | None, ties: list[Trial], wall_s: float) -> dict[str, Any]:
    both = [t for t in s.trials if t.proxy and t.full]
    seen: dict[str, Trial] = {t.artifact: t for t in both}  # one point per graph
    counts: dict[str, int] = {}
    for t in s.trials:
        counts[t.status] = counts.get(t.status, 0) + 1
    rules: dict[str, int] = {}
    for t in s.trials:
        if t.rule:
            rules[t.rule] = rules.get(t.rule, 0) + 1
    ratio = None
    if chosen is not None and chosen.speed and s.baseline.get("tokens_per_s"):
        if "samples" in chosen.speed and "samples" in s.baseline:
            lo, mid, hi = ratio_band(chosen.speed, s.baseline)
            ratio = {"median": round(mid, 3), "q25": round(lo, 3), "q75": round(hi, 3)}
        else:
            ratio = {"median": round(chosen.speed["tokens_per_s"] / s.baseline["tokens_per_s"], 3)}
    return {
        "chosen": chosen.candidate.key if chosen else None,
        "chosen_label": chosen.candidate.label() if chosen else None,
        "ties": [t.candidate.key for t in ties],
        "measured": s.ctx.target.is_cpu or s.measure,
        "speedup_vs_fp32": ratio,  # per-repeat ratios to the fp32 export (cpu), quartiles
        "counts": counts,
        "rejections": rules,
        "rank_agreement": rank_agreement(
            [t.proxy["kl_mean"] for t in seen.values()],  # type: ignore[index]
            [t.full["kl_mean"] for t in seen.values()],  # type: ignore[index]
        ),
        "trials": {"computed": len(s.store.computed), "reused": len(s.store.reused)},
        "wall_s": round(wall_s, 1),
    }


def _prune_step(s: Search, export: ExportSection) -> str:
    """The `kiln prune` and `kiln export` commands a pruned recipe's EXPORT comes from."""
    pairs = (item.split("=") for item in export.prune.split(","))
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in pairs if float(v))
    ctx = f" --max-context {export.max_context}" if export.max_context else ""
    return (
        f"kiln prune {s.model} --out PRUNED --calibration {s.ctx.calibration} {flags}; "
        f"kiln export PRUNED --kv {export.kv}{ctx} --out EXPORT; "
    )


def _write(s: Search, out: Path, chosen: Trial | None, summary: dict[str, Any]) -> None:
    from kiln.tune.report import write_chart, write_markdown, write_tune_json

    if chosen is not None:
        c = chosen.candidate
        profile = s.ctx.target.profile
        picked = replace(
            s.recipe,
            measured=summary["measured"],
            export=make.export_section(c, s.ctx, s.full),
            optimize=chosen.optimize or make.optimize_section(c, s.ctx),
            build=BuildSection(profile.name, c["precision"]) if profile else None,
            runtime=RuntimeSection(threads=c["threads"], slots=c["slots"]),
            search={},
        )
        save_recipe(
            picked,
            out / RECIPE_FILE,
            header=f"chosen by `kiln tune {s.model} --target {s.ctx.target.name}`: "
            f"{c.label()}\nuse: "
            + (_prune_step(s, picked.export) if picked.export.prune else "")
            + f"kiln optimize EXPORT --recipe {RECIPE_FILE}"
            + ("; kiln build OPTIMIZED --recipe " + RECIPE_FILE if profile else ""),
        )
    else:
        (out / RECIPE_FILE).unlink(missing_ok=True)
    write_tune_json(s, out / TUNE_FILE, summary)
    chart = write_chart(s, out / CHART_FILE)
    write_markdown(s, out / REPORT_FILE, summary, chart)
