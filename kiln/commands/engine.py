"""`kiln build`: the engine stage's command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from kiln.errors import ConfigError
from kiln.extras import require_extra


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln build`."""
    p = sub.add_parser(
        "build",
        help="ONNX artifact -> TensorRT engine per GPU profile (engine.plan + engine.json)",
        description=(
            "Build a TensorRT / TensorRT-RTX engine for each GPU profile (models/gpus/*.toml) "
            "from kiln export or kiln optimize artifact folders. Each engine goes to "
            "OUT/<profile>/ with engine.json (ONNX hash, profile, library version, compute "
            "capabilities, I/O shape ranges per optimization profile, build time, size). "
            "Unchanged inputs skip the build. Prints a table of what was built."
        ),
    )
    p.add_argument(
        "artifacts",
        type=Path,
        nargs="+",
        metavar="ARTIFACT",
        help="artifact folder(s) with model.onnx and export.json/optimize.json; with several, "
        "each profile uses the one whose graph has its precision",
    )
    p.add_argument(
        "--profile",
        action="append",
        default=[],
        metavar="NAME_OR_TOML",
        help="GPU profile name in models/gpus/ or a path to a .toml; repeat or comma-separate; "
        "'all' builds every shipped profile (profiles whose backend is missing are skipped)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="engines folder; each profile goes to OUT/<profile>/ "
        "(default: engines/ beside the first artifact)",
    )
    p.add_argument(
        "--force", action="store_true", help="rebuild even when engine.json is up to date"
    )
    p.add_argument(
        "--recipe",
        type=Path,
        default=None,
        help="recipe TOML (as `kiln tune` writes): builds its [build] profile at its precision",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    require_extra("engine", "kiln build")
    from kiln.engine.matrix import build_matrix, format_table, resolve_profiles

    profiles = resolve_profiles(args.profile) if args.profile else []
    if args.recipe is not None:
        from kiln.tune.recipe import build_profile

        profiles.append(build_profile(args.recipe))
    if not profiles:
        raise ConfigError("kiln build needs --profile NAME (models/gpus/) or --recipe FILE.")
    out = args.out or args.artifacts[0].resolve().parent / "engines"
    rows = build_matrix(args.artifacts, profiles, out, force=args.force)
    print(format_table(rows))
    failed = [r for r in rows if r.status.startswith("FAILED")]
    return 1 if failed or not any(r.ok for r in rows) else 0
