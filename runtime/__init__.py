"""Runtime stage: an artifact (ONNX or TensorRT engines) in, tokens and text out.

`load(artifact)` gives a `Generator` with `.generate(...)` and `.stream(...)`. Every artifact
runs over slots (runtime/slots.py `SlotBackend`) through one decode loop (runtime/decode.py:
prefill, decode_step, generate), which the server's scheduler shares; runtime/README.md says
why and where each piece lives.
"""

from __future__ import annotations

from kiln.runtime.decode import Event
from kiln.runtime.generator import Completion, Generator, load
from kiln.runtime.sampling import SamplingParams

__all__ = [
    "Completion",
    "Event",
    "Generator",
    "SamplingParams",
    "load",
]
