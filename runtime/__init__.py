"""Runtime stage: an artifact (ONNX or TensorRT engines) in, tokens and text out.

`load(artifact)` gives a `Generator` with `.generate(...)` and `.stream(...)`; the decode loop
(runtime/decode.py: prefill, decode_step, generate) is the same for every backend.
"""

from __future__ import annotations

from kiln.runtime.decode import Event
from kiln.runtime.generator import Completion, Generator, load
from kiln.runtime.sampling import SamplingParams

__all__ = ["Completion", "Event", "Generator", "SamplingParams", "load"]
