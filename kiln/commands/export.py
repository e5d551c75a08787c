"""`kiln export`: the export stage's command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.extras import require_extra
from kiln.layouts import CONCAT, LAYOUTS, STATIC
from kiln.precisions import names_for


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln export`."""
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
        choices=names_for("export"),
        default="fp32",
        help="weights and activations of the exported graph; parity is judged against the fp32 "
        "PyTorch model with this precision's tolerance (kiln/parity.py)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset (default: "
        + ", ".join(f"{x.default_opset} for --kv {x.name}" for x in LAYOUTS.values())
        + "; plain opset-18 ops run everywhere, TensorScatter exists from opset 24)",
    )
    p.add_argument(
        "--kv",
        choices=list(LAYOUTS),
        default=CONCAT.name,
        help="KV-cache layout: "
        + "; ".join(f"{layout.name} ({layout.help})" for layout in LAYOUTS.values()),
    )
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help=f"with --kv {STATIC.name}: tokens each slot buffer holds (prompt + generated), "
        f"at least {STATIC.min_context}",
    )
    p.add_argument(
        "--allow-drift",
        action="store_true",
        help="keep the artifact even when parity fails (recorded in export.json)",
    )
    p.add_argument(
        "--force", action="store_true", help="re-export even when the cached artifact is current"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    require_extra("export", "kiln export")
    from kiln.export import export_model

    out = args.out or Path("out") / args.model.resolve().name / "onnx"
    export_model(
        args.model,
        out,
        precision=args.precision,
        opset=args.opset,
        kv=args.kv,
        max_context=args.max_context,
        allow_drift=args.allow_drift,
        force=args.force,
    )
    return 0
