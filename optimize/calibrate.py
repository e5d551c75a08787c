"""Calibration for the optimize stage: token sequences in, per-MatMul input statistics out.

Statistics come from ONNX Runtime on CPU running the graph being optimized: the inputs of a few
constant-weight MatMuls at a time are added as graph outputs, every calibration sequence is fed
as one prefill, and each input's XᵀX (float64, [K, K]) is accumulated and the activations
dropped. So peak memory is the model, one group's Hessians and one sequence's activations of
that group, never the activations of the whole calibration set (`peak_bytes` says how much).

Calibration text is a file the user names, tokenized by the model's own tokenizer; never the
held-out text an evaluation scores (evaluate/text.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from kiln.errors import ConfigError
from kiln.graph_io import np_dtype
from kiln.layouts import CONCAT, layout_of_inputs


@dataclass(frozen=True)
class Calibration:
    """Token sequences (int64) to run through a graph, and where they came from."""

    sequences: tuple[tuple[int, ...], ...]
    source: str

    @property
    def tokens(self) -> int:
        """Tokens over all sequences."""
        return sum(len(s) for s in self.sequences)

    def describe(self) -> dict[str, Any]:
        """The manifest record."""
        return {"source": self.source, "sequences": len(self.sequences), "tokens": self.tokens}

    @classmethod
    def from_config(cls, config: Any) -> Calibration | None:
        """The calibration a pass config carries (key 'calibration', see `as_config`), or None."""
        record = config.get("calibration") if hasattr(config, "get") else None
        if not record:
            return None
        return cls(tuple(tuple(int(t) for t in s) for s in record["sequences"]), record["source"])

    def as_config(self) -> dict[str, Any]:
        """What optimize_model's `pass_config` carries for the calibrated passes."""
        return {
            "calibration": {"sequences": [list(s) for s in self.sequences], "source": self.source}
        }


def calibration_from_text(
    path: Path, tokenizer_dir: Path, *, sequences: int = 16, length: int = 256
) -> Calibration:
    """`sequences` windows of `length` tokens spread evenly over the text at `path`."""
    from transformers import AutoTokenizer

    if not path.is_file():
        raise ConfigError(f"calibration text {path} does not exist; pass --calibration FILE.")
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(path.read_text())["input_ids"]
    if len(ids) < length:
        raise ConfigError(
            f"calibration text {path} has {len(ids)} tokens, fewer than one window of {length}; "
            "give a longer file."
        )
    starts = np.linspace(0, len(ids) - length, num=min(sequences, len(ids) // length)).astype(int)
    windows = tuple(tuple(ids[s : s + length]) for s in starts)
    return Calibration(windows, f"{path.name} ({len(ids)} tokens)")


def _prefill_feeds(session: Any, ids: np.ndarray) -> dict[str, np.ndarray]:
    """A one-row prefill of `ids` from an empty cache, for either KV layout."""
    inputs = session.get_inputs()
    layout = layout_of_inputs([i.name for i in inputs])
    s = len(ids)
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids[None, :].astype(np.int64),
        "position_ids": np.arange(s, dtype=np.int64)[None, :],
    }
    if layout is CONCAT:
        feeds["attention_mask"] = np.ones((1, s), np.int64)
    else:
        feeds["write_index"] = np.zeros(1, np.int64)
    for i in inputs[len(layout.leading_inputs) :]:
        hkv, t, d = i.shape[1], i.shape[2], i.shape[3]
        length = 0 if layout is CONCAT else int(t)
        feeds[i.name] = np.zeros((1, int(hkv), length, int(d)), np_dtype(i.type))
    return feeds


def max_length(model: ir.Model) -> int | None:
    """The static layout's cache length (a calibration sequence must fit), None for concat."""
    names = [v.name or "" for v in model.graph.inputs]
    if layout_of_inputs(names) is CONCAT:
        return None
    shape = model.graph.inputs[len(layout_of_inputs(names).leading_inputs)].shape
    return int(shape[2]) if shape is not None and isinstance(shape[2], int) else None


def hessians(
    model: ir.Model, calibration: Calibration, values: list[ir.Value]
) -> dict[str, np.ndarray]:
    """XᵀX [K, K] float64 of each named value over every calibration token, via ONNX Runtime.

    The model is run as it is now (earlier groups already quantized: GPTQ's sequential order).
    """
    from kiln.graph_io import ort_session

    proto = ir.serde.serialize_model(model)
    names = [v.name for v in values if v.name]
    for name in names:
        out = proto.graph.output.add()
        out.name = name
    session = ort_session(proto.SerializeToString(), optimization="basic")
    limit = max_length(model)
    acc = {n: np.zeros((0, 0)) for n in names}
    for seq in calibration.sequences:
        ids = np.array(seq[:limit] if limit else seq, np.int64)
        got = session.run(names, _prefill_feeds(session, ids))
        for name, x in zip(names, got, strict=True):
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
            acc[name] = x2.T @ x2 if acc[name].size == 0 else acc[name] + x2.T @ x2
    return acc


def groups_in_order(inputs: list[ir.Value], size: int) -> Iterator[list[ir.Value]]:
    """The distinct MatMul inputs in graph order, `size` at a time (about one decoder layer)."""
    seen: list[ir.Value] = []
    for v in inputs:
        if v not in seen:
            seen.append(v)
    for i in range(0, len(seen), size):
        yield seen[i : i + size]


def peak_bytes(ks: list[int], tokens: int) -> int:
    """Bytes a group holds: its float64 Hessians plus one sequence's float32 activations."""
    return sum(8 * k * k + 4 * tokens * k for k in ks)


def log_probs(model: ir.Model, calibration: Calibration) -> list[np.ndarray]:
    """Next-token log-probabilities [S, V] (float32) of each calibration sequence, via ORT."""
    from kiln.graph_io import ort_session

    session = ort_session(model, optimization="basic")
    limit = max_length(model)
    out = []
    for seq in calibration.sequences:
        ids = np.array(seq[:limit] if limit else seq, np.int64)
        logits = session.run(["logits"], _prefill_feeds(session, ids))[0][0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        out.append((logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32))
    return out


def mean_kl(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Mean KL(reference || candidate) over every position, in nats."""
    total, n = 0.0, 0
    for r, c in zip(reference, candidate, strict=True):
        p = np.exp(r.astype(np.float64))
        total += float((p * (r.astype(np.float64) - c.astype(np.float64))).sum())
        n += r.shape[0]
    return total / max(n, 1)
