"""Fixed probe inputs run through ONNX Runtime CPU: the runner's drift measurement.

Two calls per graph, batch 2 with row 1 left-padded by 2: a prefill of 6 tokens (past 0) and
a 3-token continuation over the *source* graph's own cache (so every graph sees identical
inputs, cast to its past dtype). Logits at padded query positions are dropped.
Letters: B batch, S new tokens, P past length, Hkv KV heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

_NP = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def ort_session_from_ir(model: ir.Model) -> Any:
    """An ONNX Runtime CPU session over an in-memory model, ORT graph optimizations off."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Run the graph as written: ORT's own fusions (Gelu, attention, ...) would otherwise turn
    # the unfused and the fused graph into the same kernels and hide a pass's drift.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    blob = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])


def _positions(mask: np.ndarray, new: int) -> np.ndarray:
    pos = np.cumsum(mask, axis=1) - 1
    return np.where(mask == 0, 1, pos)[:, -new:].astype(np.int64)


@dataclass
class OnnxProbe:
    """Probe logits of an `ir.Model`; `prepare` maps graphs ORT cannot run (bf16) to ones it can."""

    vocab: int
    seed: int = 0
    prepare: Callable[[ir.Model], ir.Model] | None = None
    _calls: list[dict[str, np.ndarray]] = field(default_factory=list)

    def _feeds(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        if self._calls:
            return self._calls
        rng = np.random.default_rng(self.seed)
        ids = rng.integers(3, self.vocab, size=(2, 9), dtype=np.int64)
        mask = np.ones((2, 9), np.int64)
        mask[1, :2] = 0
        past = {v.name: v for v in model.graph.inputs if v.name.startswith("past_key_values")}
        empty = {
            n: np.zeros((2, v.shape[1], 0, v.shape[3]), np.float32)  # type: ignore[index]
            for n, v in past.items()
        }
        first = {"input_ids": ids[:, :6], "attention_mask": mask[:, :6]}
        first["position_ids"] = _positions(mask[:, :6], 6)
        self._calls = [{**first, **empty}]
        outs = self._run(model, self._calls[0])
        present = dict(zip([o.name for o in model.graph.outputs], outs, strict=True))
        second = {
            "input_ids": ids[:, 6:],
            "attention_mask": mask,
            "position_ids": _positions(mask, 3),
        }
        for n in past:
            second[n] = present[n.replace("past_key_values", "present")].astype(np.float32)
        self._calls.append(second)
        return self._calls

    def _run(self, model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        runnable = self.prepare(model) if self.prepare else model
        sess = ort_session_from_ir(runnable)
        typed = {}
        for i in sess.get_inputs():
            dtype = np.float16 if i.type == "tensor(float16)" else None
            typed[i.name] = feeds[i.name].astype(dtype) if dtype else feeds[i.name]
        return sess.run(None, typed)

    def logits(self, model: ir.Model) -> list[np.ndarray]:
        """Float32 logits of each probe call at unpadded query positions, [positions, V]."""
        out = []
        for feeds in self._feeds(model):
            logits = self._run(model, feeds)[0].astype(np.float32)
            valid = feeds["attention_mask"][:, -feeds["input_ids"].shape[1] :].astype(bool)
            out.append(logits[valid])
        return out


@dataclass
class StaticProbe(OnnxProbe):
    """Probe logits of a static-KV graph: 2 slots, a ragged right-padded prefill, then 3 more.

    Call 1 writes 6 and 4 real tokens at write_index 0 (slot 1 right-padded, padding positions
    repeat its last one); call 2 continues both slots by 3 tokens at write_index (6, 4) over the
    source graph's own buffers. Logits at padding positions are dropped.
    Letters: B slots, S new tokens, M max_context.
    """

    _valid: list[np.ndarray] = field(default_factory=list)

    def _feeds(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        if self._calls:
            return self._calls
        rng = np.random.default_rng(self.seed)
        ids = rng.integers(3, self.vocab, size=(2, 9), dtype=np.int64)
        past = {v.name: v for v in model.graph.inputs if v.name.startswith("past_key_values")}
        buffers = {
            n: np.zeros((2, v.shape[1], v.shape[2], v.shape[3]), np.float32)  # type: ignore[index]
            for n, v in past.items()
        }
        real = np.array([6, 4])
        first_ids = np.where(np.arange(6)[None, :] < real[:, None], ids[:, :6], 0)
        first = {
            "input_ids": first_ids,
            "position_ids": np.minimum(np.arange(6)[None, :], real[:, None] - 1).astype(np.int64),
            "write_index": np.zeros(2, np.int64),
        }
        self._calls = [{**first, **buffers}]
        outs = self._run(model, self._calls[0])
        present = dict(zip([o.name for o in model.graph.outputs], outs, strict=True))
        second = {
            "input_ids": ids[:, 6:],
            "position_ids": (real[:, None] + np.arange(3)[None, :]).astype(np.int64),
            "write_index": real.astype(np.int64),
        }
        for n in past:
            second[n] = present[n.replace("past_key_values", "present")].astype(np.float32)
        self._calls.append(second)
        self._valid = [np.arange(6)[None, :] < real[:, None], np.ones((2, 3), bool)]
        return self._calls

    def logits(self, model: ir.Model) -> list[np.ndarray]:
        """Float32 logits of each probe call at real (unpadded) positions, [positions, V]."""
        out = []
        for feeds, valid in zip(self._feeds(model), self._valid, strict=True):
            logits = self._run(model, feeds)[0].astype(np.float32)
            out.append(logits[valid])
        return out
