"""Session fixtures: tiny models of every family saved to disk, and their export artifacts."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tiny_models import STATIC_MAX_CONTEXT, STATIC_MAX_CONTEXT_TINY, save_tiny


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: the folder of the named tiny model, saved once per session."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = save_tiny(name, tmp_path_factory.mktemp(f"hf-{name}"))
        return made[name]

    return get


@pytest.fixture(scope="session")
def exported(
    tiny_model_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """Factory: the export artifact of a tiny model (or the bundled one), made once per session."""
    from kiln.export import export_model

    made: dict[tuple[str, str, str], Path] = {}

    def get(name: str, precision: str = "fp32", kv: str = "concat") -> Path:
        """Export once per (model, precision, KV layout); static slots per STATIC_MAX_CONTEXT."""
        if (name, precision, kv) not in made:
            if name == "zen":
                from kiln.models.zen import ZEN_DIR

                src = ZEN_DIR
            else:
                src = tiny_model_dir(name)
            out = tmp_path_factory.mktemp(f"onnx-{name}-{precision}-{kv}") / "onnx"
            max_context = STATIC_MAX_CONTEXT.get(name, STATIC_MAX_CONTEXT_TINY)
            max_context = max_context if kv == "static" else None
            made[name, precision, kv] = export_model(
                src, out, precision=precision, kv=kv, max_context=max_context
            )
        return made[name, precision, kv]

    return get
