"""ONNX Runtime backend: the exported concat-KV graph on CPU, or on CUDA with onnxruntime-gpu.

IO binding keeps `present` outputs as OrtValues and binds them as the next step's `past` inputs,
so the cache is never converted to numpy (or copied off the GPU) between steps; only the logits
come back to the host.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError
from kiln.runtime.kv_cache import ConcatKVCache

log = logging.getLogger(__name__)

_NP_DTYPE = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def available_providers() -> list[str]:
    """ONNX Runtime execution providers in this install (CUDA only with onnxruntime-gpu)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when onnxruntime-gpu is installed, else 'cpu'; 'cuda' without it fails."""
    providers = available_providers()
    if device == "auto":
        return "cuda" if "CUDAExecutionProvider" in providers else "cpu"
    if device == "cuda" and "CUDAExecutionProvider" not in providers:
        raise ArtifactError(
            f"device 'cuda' needs onnxruntime-gpu; this onnxruntime has {providers}. "
            "Install onnxruntime-gpu or use --device cpu."
        )
    return device


class OrtBackend:
    """An InferenceSession over a model.onnx with the export stage's I/O contract."""

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
        import onnxruntime as ort

        device = resolve_device(device)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        # Spinning between ops, as in OrtSlotBackend (runtime/ort_slots.py): faster on an idle
        # host (+10% smollm concat decode), much slower on a shared one (spin=False there).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if profile_dir is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(profile_dir / "ort_profile")
        ep = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else []
        self.session = ort.InferenceSession(
            str(onnx_path), opts, providers=ep or ["CPUExecutionProvider"]
        )
        self.device = device
        self.name = f"onnxruntime-{device}"
        self.max_context = max_context
        self.max_batch: int | None = None
        self.io_binding = io_binding
        inputs = self.session.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        self.present_names = [
            o.name for o in self.session.get_outputs() if o.name.startswith("present.")
        ]
        first = inputs[[i.name for i in inputs].index(self.past_names[0])]
        self.kv_dtype = _NP_DTYPE[first.type]
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.vocab = int(self.session.get_outputs()[0].shape[-1])

    def _ortvalue(self, a: np.ndarray) -> Any:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(a, self.device, 0)

    def new_cache(self, batch: int) -> ConcatKVCache:
        """Zero-length past arrays (prefill reads P = 0)."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        past = [self._ortvalue(empty) if self.io_binding else empty for _ in self.past_names]
        if not self.io_binding:
            return ConcatKVCache(past, capacity=self.max_context)
        return ConcatKVCache(
            past,
            capacity=self.max_context,
            to_host=lambda v: v.numpy(),
            from_host=self._ortvalue,
        )

    def forward(
        self, ids_BS: np.ndarray, mask_BT: np.ndarray, pos_BS: np.ndarray, cache: Any
    ) -> np.ndarray:
        """One graph call; the presents replace the cache's past."""
        if not self.io_binding:
            feeds = {"input_ids": ids_BS, "attention_mask": mask_BT, "position_ids": pos_BS}
            feeds.update(zip(self.past_names, cache.past, strict=True))
            logits, *present = self.session.run(None, feeds)
            cache.append(present, ids_BS.shape[1])
            return np.asarray(logits[:, -1], dtype=np.float32)
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids_BS))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask_BT))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(pos_BS))
        for name, value in zip(self.past_names, cache.past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        cache.append(present, ids_BS.shape[1])
        return np.asarray(logits.numpy()[:, -1], dtype=np.float32)

    def end_profiling(self) -> str | None:
        """Stop ORT's profiler (when enabled) and return the JSON trace path."""
        return (
            self.session.end_profiling()
            if self.session.get_session_options().enable_profiling
            else None
        )
