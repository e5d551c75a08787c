"""The `kiln` command: one subcommand per stage, plus `demo`.

Heavy libraries are imported inside each command, so `kiln --help` is instant and works
without the optional extras.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kiln.errors import KilnError
from kiln.log import setup_logging

log = logging.getLogger("kiln")


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="PyTorch/transformers model folder -> ONNX with KV cache, checked against PyTorch",
        description=(
            "Export a local Hugging Face causal LM (config.json + safetensors) to one ONNX graph "
            "that serves prefill and decode: inputs input_ids, attention_mask, position_ids, "
            "past_key_values.{i}.key/value; outputs logits, present.{i}.key/value. The graph is "
            "run through ONNX Runtime and compared with PyTorch before it is published with an "
            "export.json manifest."
        ),
    )
    p.add_argument("model", type=Path, help="local Hugging Face model folder")
    p.add_argument(
        "--out", type=Path, default=None, help="artifact folder (default: out/<model name>/onnx)"
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="weights and activations of the exported graph; parity is judged against the fp32 "
        "PyTorch model with this precision's tolerance (kiln/parity.py)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=18,
        help="ONNX opset (default 18: plain ops every runtime runs)",
    )
    p.add_argument(
        "--allow-drift",
        action="store_true",
        help="keep the artifact even when parity fails (recorded in export.json)",
    )
    p.add_argument(
        "--force", action="store_true", help="re-export even when the cached artifact is current"
    )
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from kiln.export import export_model

    out = args.out or Path("out") / args.model.resolve().name / "onnx"
    export_model(
        args.model,
        out,
        precision=args.precision,
        opset=args.opset,
        allow_drift=args.allow_drift,
        force=args.force,
    )
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole pipeline on the bundled model; prints the text each artifact generates",
        description=(
            "Run every stage on the bundled model (models/zen-llama) and print the Zen of Python "
            "as generated greedily from each artifact, with each stage's time."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="where artifacts go")
    p.add_argument("--model", type=Path, default=None, help="model folder (default: bundled)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kiln.demo import run_demo

    return run_demo(args.out, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Hugging Face causal LMs in; verified ONNX and TensorRT engines per GPU out.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_export(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; a KilnError prints its message and exits 1."""
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args))
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 1
