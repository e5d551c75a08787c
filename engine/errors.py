"""The engine stage's errors, in kiln's one family (kiln/errors.py)."""

from __future__ import annotations

from kiln.errors import ArtifactError, ConfigError, KilnError


class ProfileError(ConfigError):
    """A GPU profile does not fit the artifact (precision, shapes) or cannot be built."""


class EngineBuildError(KilnError):
    """The TensorRT library is missing or could not build the engine."""


class ParseError(EngineBuildError):
    """TensorRT could not parse the ONNX; the message names the node, op and fix."""


class EngineMismatchError(ArtifactError):
    """An engine's manifest does not match the GPU or library that wants to run it."""
