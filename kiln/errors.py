"""One family of user-facing errors: each message says what went wrong and what to do next.

The CLI prints a KilnError's message and exits 1 without a traceback; any other exception is a
bug in kiln and keeps its traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class ConfigError(KilnError):
    """A configuration file, flag or model config is malformed."""


class UnsupportedModelError(KilnError):
    """The model's architecture is not one kiln knows how to export."""


class ExportError(KilnError):
    """PyTorch to ONNX conversion failed."""


class ParityError(KilnError):
    """A stage's output drifted past its precision's tolerance against the reference."""


class ArtifactError(KilnError):
    """An artifact folder is missing, incomplete or was made by something else."""


class RequestError(KilnError):
    """A serving request the server cannot run as given (the server answers HTTP 4xx).

    `status` is the HTTP status, `param` the request field at fault (OpenAI error shape), `code`
    a short machine-readable reason such as "context_length_exceeded".
    """

    def __init__(
        self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


class QualityBudgetError(KilnError):
    """A compressed model costs more quality (KL against the original) than its budget allows."""
