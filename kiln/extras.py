"""Which optional extra (pyproject.toml) each command needs, checked before it imports any.

The core install runs artifacts; exporting, optimizing, building engines and serving need
extras. A command whose extra is missing stops with the pip line that installs it, instead of
a ModuleNotFoundError from deep inside a stage.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

from kiln.errors import KilnError

# extra -> the modules whose absence means the extra is not installed (import names)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "export": ("torch", "transformers", "onnx", "onnxscript", "onnx_ir", "ml_dtypes"),
    "engine": ("onnx",),  # the TensorRT library itself is checked per GPU profile (engine/)
    "serve": ("fastapi", "uvicorn", "prometheus_client", "llguidance"),
    "ray": ("ray", "fastapi", "uvicorn", "prometheus_client", "llguidance"),
}


class MissingExtraError(KilnError):
    """A command needs an optional extra that is not installed."""


def require_extra(extra: str, command: str) -> None:
    """Raise MissingExtraError naming the extra and its pip line when a module of it is missing."""
    missing = [m for m in EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"{command} needs the '{extra}' extra: pip install 'kiln[{extra}]' "
            f"(missing: {', '.join(missing)})"
        )


def kiln_version() -> str:
    """The installed kiln distribution's version ('unknown' when run from an uninstalled tree)."""
    try:
        return metadata.version("kiln")
    except metadata.PackageNotFoundError:
        return "unknown"
