"""Load a local Hugging Face model folder, with errors that name the file and the fix.

No hub is reachable here, but the loading path is the real one (`from_pretrained(path)`), so
the same code serves any local checkpoint.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.artifacts import TOKENIZER_FILES, sha256_files
from kiln.errors import ConfigError, KilnError
from kiln.models.families import Family, family_for

log = logging.getLogger(__name__)

WEIGHT_GLOBS = ("*.safetensors", "*.bin")


@dataclass
class Source:
    """A model folder as the manifest describes it: family, content hash, files."""

    path: Path
    family: Family
    sha256: str
    files: list[str]


def read_config(folder: Path) -> dict[str, Any]:
    """Parse config.json, or raise a ConfigError naming the file and what is wrong."""
    if not folder.is_dir():
        raise KilnError(
            f"Model folder {folder} does not exist; pass a local Hugging Face model folder "
            "(config.json + *.safetensors), e.g. models/zen-llama."
        )
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{folder} has no config.json; a Hugging Face model folder needs config.json and "
            "weights (save one with model.save_pretrained(folder))."
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}; re-save the model's config.") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(cfg).__name__}.")
    return cfg


def describe_source(folder: Path) -> Source:
    """Check the folder and its family and hash its files, without loading any weights."""
    folder = Path(folder)
    raw = read_config(folder)
    family = family_for(raw.get("model_type"), where=str(folder / "config.json"))
    weights = [p for g in WEIGHT_GLOBS for p in folder.glob(g)]
    if not weights:
        raise KilnError(
            f"{folder} has no weights (*.safetensors or *.bin); save them with "
            "model.save_pretrained(folder)."
        )
    hashed = sorted({*weights, folder / "config.json"})
    hashed += [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]
    return Source(
        path=folder,
        family=family,
        sha256=sha256_files(hashed, folder),
        files=sorted(str(p.relative_to(folder)) for p in hashed),
    )


def load_model(folder: Path) -> Any:
    """The fp32 transformers model in `folder`, in eval mode, through `from_pretrained`."""
    import sys

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()  # bars only on a terminal

    try:
        AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{folder / 'config.json'} could not be read by transformers: {e}") from e
    try:
        # sdpa traces to plain MatMul/Softmax at opset 18; fp32 is the reference precision.
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation="sdpa"
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise KilnError(f"Could not load the weights in {folder}: {e}") from e
    return model.eval()
