"""`kiln compress`: calibrated int4, mixed precision or 2:4 sparsity of an export artifact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kiln.extras import require_extra
from kiln.precisions import OPTIMIZE_TARGETS

_METHODS = ("gptq-int4", "mixed", "sparse24", "sparse24-calibrated")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln compress`."""
    p = sub.add_parser(
        "compress",
        help="export artifact -> calibrated int4 / mixed precision / 2:4 sparse ONNX, KL-gated",
        description=(
            "Run the optimize stage with a compression pass (optimize/methods.py): gptq-int4 "
            "(GPTQ rounding with a clipping search, calibrated through ONNX Runtime), mixed "
            "(int4/int8/float per MatMul group within --weight-budget-mib, least KL), sparse24 "
            "(2 of every 4 weights along K by magnitude; sparse24-calibrated: by |w| x activation "
            "norm). The result is gated by mean KL against the export on calibration windows."
        ),
    )
    p.add_argument("artifact", type=Path, help="export artifact folder (made by `kiln export`)")
    p.add_argument("--method", choices=_METHODS, required=True)
    p.add_argument(
        "--calibration",
        type=Path,
        required=True,
        help="text file to calibrate and gate on (the model's domain; never held-out text)",
    )
    p.add_argument("--target", choices=OPTIMIZE_TARGETS, default="tensorrt")
    p.add_argument("--weight-budget-mib", type=float, default=None, help="mixed: size budget")
    p.add_argument(
        "--max-kl", type=float, default=None, help="quality budget: mean KL (nats) to refuse over"
    )
    p.add_argument("--sequences", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--length", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--out", type=Path, default=None, help="default <artifact>/../compressed-METHOD")
    p.add_argument("--force", action="store_true", help="redo the work even when current")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    require_extra("export", "kiln compress")
    from kiln.optimize.methods import compress_artifact

    out = args.out or args.artifact.resolve().parent / f"compressed-{args.method}"
    record = compress_artifact(
        args.artifact,
        out,
        method=args.method,
        calibration=args.calibration,
        target=args.target,
        weight_budget_mib=args.weight_budget_mib,
        max_kl=args.max_kl,
        sequences=args.sequences,
        length=args.length,
        force=args.force,
    )
    print(json.dumps(record["gate"], indent=2))
    print(f"wrote {out}")
    return 0
