"""`kiln prune`: a smaller Hugging Face folder by training-free structured pruning."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kiln.extras import require_extra


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `kiln prune`."""
    p = sub.add_parser(
        "prune",
        help="Hugging Face folder -> smaller one (layers, KV groups, MLP channels, vocabulary)",
        description=(
            "Training-free structured pruning of a Llama-family model (compress/prune.py): drop "
            "the decoder layers that change the hidden state least, the KV groups and MLP "
            "channels with the least activation, and the tokens the --vocab-corpus never uses; "
            "measured on --calibration text and gated by --max-kl. The output loads in "
            "transformers and `kiln export` takes it as any model; prune.json records the cuts."
        ),
    )
    p.add_argument("model", type=Path, help="Hugging Face model folder")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--calibration", type=Path, required=True, help="text to measure cuts on")
    p.add_argument("--layers", type=float, default=0.0, help="fraction of decoder layers to drop")
    p.add_argument("--kv-groups", type=float, default=0.0, help="fraction of KV groups to drop")
    p.add_argument("--mlp", type=float, default=0.0, help="fraction of MLP channels to drop")
    p.add_argument(
        "--vocab-corpus",
        type=Path,
        nargs="*",
        default=None,
        help="keep only tokens these files (and the calibration text) use",
    )
    p.add_argument("--max-kl", type=float, default=None, help="quality budget, mean KL in nats")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    require_extra("export", "kiln prune")
    from kiln.compress import PruneSpec, prune_model

    record = prune_model(
        args.model,
        args.out,
        calibration=args.calibration,
        spec=PruneSpec(layers=args.layers, kv_groups=args.kv_groups, mlp=args.mlp),
        vocab_corpus=args.vocab_corpus,
        max_kl=args.max_kl,
    )
    print(json.dumps({k: record[k] for k in ("params_before", "params_after", "gate")}, indent=2))
    return 0
