"""The `kiln` command: one subcommand per stage, plus `demo`.

Heavy libraries are imported inside each command, so `kiln --help` is instant and works
without the optional extras.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from kiln.errors import KilnError
from kiln.extras import kiln_version, require_extra
from kiln.log import setup_logging

log = logging.getLogger("kiln")

# One module per stage command (kiln/commands/), each with `add_parser(subparsers)`; it imports
# nothing heavy at module level (the stage packages import torch), so `kiln --help` stays instant.
COMMANDS = (
    "kiln.commands.export",
    "kiln.commands.engine",
    "kiln.commands.optimize",
    "kiln.commands.generate",
    "kiln.commands.serve",
    "kiln.commands.eval",
    "kiln.commands.tune",
    "kiln.commands.compress",
    "kiln.commands.prune",
)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    require_extra("export", "kiln demo")
    from kiln.demo import run_demo

    return run_demo(args.out, model=args.model)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Hugging Face causal LMs in; verified ONNX and TensorRT engines per GPU out.",
    )
    parser.add_argument("--version", action="version", version=f"kiln {kiln_version()}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
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
