"""Fixtures of the eval tests: the bundled model's text and a perturbed copy of the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def zen_txt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Zen of Python as a text file (the bundled model's training text)."""
    from kiln.models.zen import zen_text

    path = tmp_path_factory.mktemp("text") / "zen.txt"
    path.write_text(zen_text())
    return path


@pytest.fixture(scope="session")
def perturbed_zen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled model with seeded noise (as large as the weights) on every MLP down-projection.

    (Scaling the final norm gain alone would only sharpen or flatten the distributions: KL
    grows but no argmax moves.)
    """
    import torch
    from safetensors.torch import load_file, save_file

    from kiln.models.zen import ZEN_DIR

    out = tmp_path_factory.mktemp("perturbed") / "zen-perturbed"
    shutil.copytree(ZEN_DIR, out)
    weights = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if name.endswith("mlp.down_proj.weight"):
            weights[name] = w + torch.randn(w.shape, generator=gen) * w.std()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out
