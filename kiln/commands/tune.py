"""`kiln tune`: choose the recipe for a model and a target under a quality budget."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.extras import require_extra


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln tune`."""
    p = sub.add_parser(
        "tune",
        help="search precision, fusions, KV layout, slots and threads under a quality budget",
        description=(
            "Span the candidates (precision, quantization method, sparsity, fusions, KV layout, "
            "slots, threads), drop hopeless ones by named rules, screen the rest on a proxy eval "
            "(KL on a short text), evaluate survivors in full against the fp32 export (kiln "
            "eval), then time them on the CPU through kiln's runtime (interleaved repeats) or, "
            "for a GPU profile, build their engines and rank them by a bandwidth cost model "
            "(measured: false). Writes tune.json, recipe.toml (the choice, for `kiln optimize "
            "--recipe` / `kiln build --recipe`), report.md and pareto.png. Cached trials make "
            "an interrupted tune continue and a rerun free. Exits 1 when nothing meets the "
            "budget, naming the closest candidate."
        ),
    )
    p.add_argument("model", type=Path, help="Hugging Face model folder")
    p.add_argument(
        "--target",
        required=True,
        help="cpu (ONNX Runtime) or a GPU profile name in models/gpus/ or a .toml path",
    )
    p.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="TOML with [budget], [workload] and [search] (knob = [values]); flags override it",
    )
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="max_kl_mean, min_top1, min_greedy, max_ppl_increase (relative); repeatable",
    )
    p.add_argument(
        "--workload",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="prompt_tokens, output_tokens, concurrency; repeatable",
    )
    p.add_argument("--out", type=Path, default=None, help="default: out/tune/<model>/<target>/")
    p.add_argument("--text", type=Path, default=None, help="eval text (default: heldout.txt)")
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="training text calibrated methods (gptq, 2:4-calibrated) calibrate on; never the "
        "eval text (default for a models/train_eval.py model: its training split)",
    )
    p.add_argument("--eval-tokens", type=int, default=None, help="tokens of the full eval")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats per candidate (cpu)")
    p.add_argument(
        "--measure",
        action="store_true",
        help="on a host with the profile's GPU: time the built engines instead of the cost model",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    require_extra("export", "kiln tune")
    from dataclasses import replace

    from kiln.tune import TUNE_FILE, tune_model
    from kiln.tune.make import FULL
    from kiln.tune.recipe import Recipe, load_recipe, override

    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    recipe = override(override(recipe, "budget", args.budget), "workload", args.workload)
    full = replace(FULL, tokens=args.eval_tokens) if args.eval_tokens else FULL
    result = tune_model(
        args.model,
        args.target,
        recipe=recipe,
        out=args.out,
        text=args.text,
        repeats=args.repeats,
        measure=args.measure,
        full=full,
        calibration=args.calibration,
    )
    s = result.summary
    print(f"[kiln] chosen: {s['chosen_label']} (speed / fp32 export: {s['speedup_vs_fp32']})")
    print(f"[kiln] trials: {s['trials']['computed']} computed, {s['trials']['reused']} reused")
    print(f"[kiln] wrote {result.out / TUNE_FILE}, recipe.toml, report.md, pareto.png")
    return 0
