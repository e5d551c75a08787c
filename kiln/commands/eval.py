"""`kiln eval`: perplexity on held-out text, and divergence from a reference model."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln eval`."""
    p = sub.add_parser(
        "eval",
        help="perplexity on held-out text; KL, top-1 and greedy agreement against a reference",
        description=(
            "Score a kiln ONNX artifact (ONNX Runtime) or a Hugging Face folder (PyTorch) on "
            "held-out text: strided sliding-window perplexity; with --reference, the mean "
            "KL(reference || candidate) of the next-token distributions at every scored "
            "position, top-1 agreement there, and greedy agreement over --greedy-tokens tokens "
            "(the reference's greedy continuation teacher-forced through the candidate). The "
            "protocol and figures are printed and written to eval.json (evaluate/README.md)."
        ),
    )
    p.add_argument("artifact", type=Path, help="candidate: ONNX artifact or Hugging Face folder")
    p.add_argument("--reference", type=Path, default=None, help="reference model (same kinds)")
    p.add_argument(
        "--text",
        type=Path,
        default=None,
        help="UTF-8 text to score (default: heldout.txt beside the model or its export source)",
    )
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument(
        "--stride", type=int, default=128, help="tokens between window starts (default 128)"
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="score only the first N tokens of the text"
    )
    p.add_argument(
        "--greedy-tokens", type=int, default=64, help="tokens generated per prompt (default 64)"
    )
    p.add_argument("--prompts", type=int, default=4, help="greedy prompts (default 4)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: default)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for eval.json (default: out/eval/<parent>/<name>/ of the artifact)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kiln.commands.args import options_from
    from kiln.evaluate import EvalOptions, evaluate_model
    from kiln.evaluate.report import EVAL_FILE, default_out

    options = options_from(EvalOptions, args)
    out = args.out if args.out is not None else default_out(args.artifact)
    report = evaluate_model(
        args.artifact, reference=args.reference, text=args.text, out=out, options=options
    )
    print("\n".join(report.lines()))
    print(f"[kiln] wrote {out / EVAL_FILE}")
    return 0
