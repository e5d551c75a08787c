"""ONNX Runtime backend: the exported concat-KV graph on CPU, or on CUDA with onnxruntime-gpu.

IO binding keeps `present` outputs as OrtValues and binds them as the next step's `past` inputs
(kiln/graph_io.py ConcatStepper.run_bound), so the cache is never converted to numpy (or copied
off the GPU) between steps; only the logits come back to the host.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from kiln.graph_io import ConcatStepper, ort_session
from kiln.runtime.kv_cache import ConcatKVCache

log = logging.getLogger(__name__)


class OrtBackend:
    """An InferenceSession over a model.onnx with the export stage's concat I/O contract."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        max_context: int,
        device: str = "auto",
        threads: int = 0,
        io_binding: bool = True,
        profile_dir: Path | None = None,
        spin: bool = True,
    ) -> None:
        # Spinning between ops: faster on an idle host (+10% smollm concat decode), much slower
        # on a shared one (spin=False there); see kiln/graph_io.py ort_session.
        session = ort_session(
            onnx_path, device=device, threads=threads, spin=spin, profile_dir=profile_dir
        )
        self.stepper = ConcatStepper(session)
        self.session = session
        self.device = self.stepper.device
        self.name = f"onnxruntime-{self.device}"
        self.max_context = max_context
        self.io_binding = io_binding
        self.kv_dtype = self.stepper.kv_dtype
        self.vocab = self.stepper.vocab

    def new_cache(self, batch: int) -> ConcatKVCache:
        """Zero-length past arrays (prefill reads P = 0)."""
        past = self.stepper.empty_past(batch)
        return ConcatKVCache([self.stepper.ortvalue(p) for p in past] if self.io_binding else past)

    def forward(
        self, ids_BS: np.ndarray, mask_BT: np.ndarray, pos_BS: np.ndarray, cache: ConcatKVCache
    ) -> np.ndarray:
        """One graph call; the presents replace the cache's past."""
        run = self.stepper.run_bound if self.io_binding else self.stepper.run
        logits, present = run(ids_BS, mask_BT, pos_BS, cache.past)
        cache.append(present, ids_BS.shape[1])
        return np.asarray(logits[:, -1], dtype=np.float32)

    def end_profiling(self) -> str | None:
        """Stop ORT's profiler (when enabled) and return the JSON trace path."""
        return (
            self.session.end_profiling()
            if self.session.get_session_options().enable_profiling
            else None
        )
