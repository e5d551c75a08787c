"""`kiln optimize`: the optimize stage's command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.extras import require_extra
from kiln.precisions import OPTIMIZE_TARGETS, names_for


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln optimize`."""
    p = sub.add_parser(
        "optimize",
        help="export artifact -> cleaned, fused, retyped ONNX with a per-pass drift report",
        description=(
            "Run cleanup, fusion and precision passes over an export artifact's model.onnx. "
            "Each pass is timed and its drift measured through ONNX Runtime on fixed probe "
            "inputs (max |Δlogit|, greedy agreement) against the budget in kiln/parity.py; the "
            "result is checked against the export graph (64 greedy tokens) and PyTorch, and "
            "published with optimize.json (every pass, counts, drift, time) next to copies of "
            "export.json, config and tokenizer files."
        ),
    )
    p.add_argument("artifact", type=Path, help="export artifact folder (made by `kiln export`)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: <artifact>/../optimized-<precision>, "
        "optimized-ort-<precision> for --target onnxruntime)",
    )
    p.add_argument(
        "--precision",
        choices=names_for("tensorrt"),
        default=None,
        help="fp32 | fp16 | bf16 (weights and activations); int8 / int4: fp16 activations with "
        "block-wise weight-only DequantizeLinear (opset 21); fp8: fp16 with FP8 E4M3 Q/DQ "
        "(SM89+ only). Default fp16.",
    )
    p.add_argument(
        "--target",
        choices=OPTIMIZE_TARGETS,
        default=None,
        help="which runtime the fused ops are chosen for: tensorrt (TensorRT / TensorRT-RTX, "
        "standard ONNX ops) or onnxruntime (ONNX Runtime CPU: com.microsoft "
        "GroupQueryAttention, RotaryEmbedding, SkipSimplifiedLayerNormalization, MatMulNBits "
        "for int8/int4; precisions fp32|int8|int4; never fed to TensorRT)",
    )
    p.add_argument(
        "--passes",
        type=_names,
        default=None,
        help="comma-separated pass names to run instead of the default list, in this order",
    )
    p.add_argument(
        "--skip", type=_names, default=[], help="comma-separated pass names to leave out"
    )
    p.add_argument(
        "--tied-embedding",
        choices=["shared", "onehot"],
        default="shared",
        help="shared (default): a tied embedding/LM-head table is stored once in the ONNX, but "
        "TensorRT-RTX still packs a second copy for the head (+V*E weights in the engine); "
        "onehot: the embedding reads the table through MatMul(OneHot(ids), W), so the engine "
        "stores it once, at the cost of a second V x E GEMM per token",
    )
    p.add_argument(
        "--no-torch-check",
        action="store_true",
        help="skip the parity check against the PyTorch source model (the export graph and "
        "the 64-token greedy check still run)",
    )
    p.add_argument(
        "--allow-drift",
        action="store_true",
        help="keep going when a pass or the result drifts past budget (recorded in optimize.json)",
    )
    p.add_argument(
        "--force", action="store_true", help="redo the work even when the artifact is current"
    )
    p.add_argument("--list-passes", action="store_true", help="print the default passes and exit")
    p.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="recipe TOML (as `kiln tune` writes): its [optimize] target, precision, passes and "
        "skip, checked against its [export] KV layout; flags given too override it",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    require_extra("export", "kiln optimize")
    from kiln.optimize import default_passes, optimize_model

    if args.recipe is not None:
        from kiln.tune.recipe import apply_optimize_recipe

        apply_optimize_recipe(args)
    args.precision = args.precision or "fp16"
    args.target = args.target or "tensorrt"
    if args.list_passes:
        names = default_passes(
            args.precision, tied_embedding=args.tied_embedding, target=args.target
        )
        print("\n".join(names))
        return 0
    suffix = "ort-" if args.target == "onnxruntime" else ""
    out = args.out or args.artifact.resolve().parent / f"optimized-{suffix}{args.precision}"
    optimize_model(
        args.artifact,
        out,
        target=args.target,
        precision=args.precision,
        passes=args.passes,
        skip=tuple(args.skip),
        tied_embedding=args.tied_embedding,
        allow_drift=args.allow_drift,
        force=args.force,
        check_torch=not args.no_torch_check,
        pass_config=getattr(args, "pass_config", None),  # a tuned recipe's calibration
    )
    return 0
