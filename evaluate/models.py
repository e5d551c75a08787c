"""The two kinds of model `kiln eval` scores, behind one small surface (`LogitModel`).

- `OnnxModel`: a kiln ONNX artifact (export or optimize, concat or static KV layout) through
  ONNX Runtime, driven by kiln/graph_io.py's steppers. bf16 graphs run as optimize's fp32
  emulation with bf16 rounding (optimize/precision/bf16.py): ONNX Runtime CPU has no bf16
  MatMul. FP8 Q/DQ graphs run at ORT's "basic" optimization level (FP8_LEVEL says why).
- `TorchModel`: a Hugging Face model folder through PyTorch in fp32 (the source of an export).

Both give the same calls: a prefill of a token list on an empty cache (logits of every
position), then one token at a time on that cache.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiln.errors import ArtifactError

# FP8 (E4M3) Q/DQ graphs run at ORT's "basic" level (constant folding, redundant-node removal:
# the graph's arithmetic as written). ONNX Runtime 1.32 on CPU was reported to compute FP8
# Q/DQ -> MatMul wrongly above "basic"; on the eval model's and the bundled model's fp8 graphs
# (fp16 activations) every level, "off" to "all", gives bitwise-identical logits in prefill and
# decode (evaluate/README.md), so "basic" costs nothing here and keeps other graphs safe.
FP8_LEVEL = "basic"
DEFAULT_LEVEL = "all"


class LogitModel(Protocol):
    """What the scorer needs: a prefill over a fresh cache and single-token steps after it."""

    @property
    def vocab(self) -> int:
        """Logits per position."""

    @property
    def max_context(self) -> int | None:
        """Longest sequence the cache holds (static KV slots), None when unbounded."""

    def describe(self) -> dict[str, Any]:
        """What ran, for the protocol: path, kind, precision, runtime settings."""

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), V] (float32) of `ids` on an empty cache."""

    def step(self, token: int) -> np.ndarray:
        """Logits [V] of one more token appended to the cache."""


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: config.json and weights, no kiln manifest."""
    return (path / "config.json").is_file() and not (path / "model.onnx").is_file()


def open_model(path: Path, *, threads: int = 0) -> OnnxModel | TorchModel:
    """The model in `path`: a kiln ONNX artifact or a Hugging Face folder; refuse anything else."""
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(
            f"{path} is not a folder; pass a kiln ONNX artifact (kiln export / kiln optimize) "
            "or a Hugging Face model folder."
        )
    if (path / "engine.json").is_file() or any(path.glob("*/engine.json")):
        raise ArtifactError(
            f"{path} holds TensorRT engines, which run only on their GPU; evaluate the ONNX "
            "folder they were built from (engine.json source.artifact) instead."
        )
    if is_hf_folder(path):
        return TorchModel(path)
    return OnnxModel(path, threads=threads)


class OnnxModel:
    """A kiln ONNX artifact through ONNX Runtime (CPU), one sequence at a time."""

    def __init__(self, path: Path, *, threads: int = 0) -> None:
        from kiln.graph_io import stepper
        from kiln.manifests import newest_manifest

        self.path = Path(path)
        self.manifests = newest_manifest(self.path)
        newest = self.manifests.newest
        self.precision = newest.precision
        self.target = getattr(newest, "target", None)  # optimize.json only
        self.level = FP8_LEVEL if self.precision == "fp8" else DEFAULT_LEVEL
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.run = stepper(self._runnable(), rows=1, threads=threads, optimization=self.level)
        self.threads = threads
        self._done = 0

    def _runnable(self) -> Path:
        """The graph ONNX Runtime runs: model.onnx, or the fp32 emulation of a bf16 one."""
        onnx_path = self.path / "model.onnx"
        if self.precision != "bf16":
            return onnx_path
        import onnx_ir as ir

        from kiln.optimize.precision.bf16 import bf16_emulation

        self._tmp = tempfile.TemporaryDirectory(prefix="kiln-eval-")
        emulated = Path(self._tmp.name) / "emulated.onnx"
        ir.save(bf16_emulation(ir.load(onnx_path)), emulated)
        return emulated

    @property
    def vocab(self) -> int:  # noqa: D102
        return self.run.vocab

    @property
    def max_context(self) -> int | None:  # noqa: D102
        return self.manifests.export.max_context

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {
            "path": str(self.path),
            "kind": "onnx",
            "stage": self.manifests.stage,
            "precision": self.precision,
            "target": self.target,
            "kv_layout": self.manifests.layout.name,
            "runtime": "onnxruntime",
            "ort_optimization": self.level,
            "bf16": "fp32 emulation with bf16 rounding" if self.precision == "bf16" else None,
            "threads": self.threads,
        }

    def prefill(self, ids: list[int]) -> np.ndarray:  # noqa: D102
        self.run.reset(1)
        logits = self.run.append(np.array([ids], np.int64), 0)
        self._done = len(ids)
        return np.asarray(logits[0], np.float32)

    def step(self, token: int) -> np.ndarray:  # noqa: D102
        logits = self.run.append(np.array([[token]], np.int64), self._done)
        self._done += 1
        return np.asarray(logits[0, -1], np.float32)


class TorchModel:
    """A Hugging Face folder through PyTorch, fp32, eager attention (as kiln export traces it)."""

    def __init__(self, path: Path) -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()  # one bar per load is noise here
        self.path = Path(path)
        self._torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self._past: Any = None

    @property
    def vocab(self) -> int:  # noqa: D102
        return int(self.model.config.vocab_size)

    @property
    def max_context(self) -> int | None:  # noqa: D102
        return None

    def describe(self) -> dict[str, Any]:  # noqa: D102
        return {
            "path": str(self.path),
            "kind": "huggingface",
            "precision": "fp32",
            "runtime": f"torch {self._torch.__version__}",
            "threads": self._torch.get_num_threads(),
        }

    def _forward(self, ids: list[int], past: Any) -> np.ndarray:
        with self._torch.no_grad():
            out = self.model(self._torch.tensor([ids]), past_key_values=past, use_cache=True)
        self._past = out.past_key_values
        return np.asarray(out.logits[0].float().numpy(), np.float32)

    def prefill(self, ids: list[int]) -> np.ndarray:  # noqa: D102
        return self._forward(ids, None)

    def step(self, token: int) -> np.ndarray:  # noqa: D102
        logits: np.ndarray = self._forward([token], self._past)[-1]
        return logits
