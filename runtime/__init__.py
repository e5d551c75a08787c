"""Runtime stage: an artifact (ONNX or TensorRT engines) in, tokens and text out.

`load(artifact)` gives a `Generator` with `.generate(...)` and `.stream(...)`; the decode loop
(runtime/decode.py: prefill, decode_step, generate) is the same for every backend. A static-KV
artifact gives a `SlotGenerator` (runtime/slot_generator.py, same API) over a `SlotBackend`
(runtime/slots.py): the ground for continuous batching.
"""

from __future__ import annotations

from kiln.runtime.decode import Event
from kiln.runtime.generator import Completion, Generator, load
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.slot_generator import SlotGenerator, load_slots

__all__ = [
    "Completion",
    "Event",
    "Generator",
    "SamplingParams",
    "SlotGenerator",
    "load",
    "load_slots",
]
