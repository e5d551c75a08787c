"""ONNX Runtime slot backend: a static-KV graph whose cache is written in place, step after step.

The `[slots, Hkv, max_context, D]` K/V buffers are allocated once and bound as BOTH the `past`
input and the `present` output of their layer, so ONNX Runtime's TensorScatter writes in place
(kiln/graph_io.py StaticStepper holds the buffers and the bindings). This backend keeps each
slot's length and plans a step into calls over slot ranges [lo, hi) (runtime/slots.py); slots
inside a range that are not fed idle on one padding token written at their length, where it
stays masked until overwritten.

Only each row's last position is sampled, so the backend loads the graph with its LM head fed
that position alone (`last_position_logits`): a prefill call of S tokens computes R rows of
logits instead of R * S. On SmolLM-135M the LM head (49152 x 576) is a fifth of a position's
work (runtime/server/README.md).

Letters in names: N feeds, R rows in one call, S new tokens, H hidden, M max_context, V vocab.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, KilnError
from kiln.graph_io import StaticStepper, ort_session
from kiln.layouts import STATIC, layout_of_inputs
from kiln.runtime.slots import SlotCall, SlotRunner

log = logging.getLogger(__name__)

# ORT's TensorScatter CPU kernel logs this (WARNING) when present is not past's buffer.
_COPY_LOG = re.compile(
    r"in-place optimization not activated, copying past_cache to present_cache \((\d+) bytes\)"
)


def scatter_copy_bytes(ort_log: str) -> int:
    """Bytes ORT's TensorScatter copied past -> present, summed from its log (0: in place)."""
    return sum(int(n) for n in _COPY_LOG.findall(ort_log))


_PROTO_LIMIT = 1_800_000_000  # a rewritten graph travels to ORT as one protobuf (< 2 GiB)


def _graph_bytes(onnx_path: Path) -> int:
    """Bytes of the graph and its external data files (what one protobuf would hold)."""
    folder = Path(onnx_path).parent
    return sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model"))


def last_position_logits(model: Any) -> bool:
    """Rewrite a static graph (onnx.ModelProto, in place) to compute logits_R1V, not logits_RSV.

    The LM head's input [R, S, H] is gathered at each row's last real position: the first
    column where position_ids reaches the row's largest value (right padding repeats the last
    position; runtime/slots.py call_inputs). No input is added, so the I/O contract stays
    kiln's. False (graph unchanged) when logits do not come from a MatMul-like node over it.
    """
    import onnx
    from onnx import helper

    g = model.graph
    head = next((n for n in g.node if "logits" in n.output), None)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits", "Gemm"):
        return False
    hidden = head.input[0]
    names = {"pos_f": "kiln_positions_f", "last_col": "kiln_last_col"}
    names |= {"h_rh": "kiln_last_hidden", "h_r1h": "kiln_last_h"}
    axes = "kiln_axes_1"
    g.initializer.append(onnx.numpy_helper.from_array(np.array([1], np.int64), axes))
    float32 = onnx.TensorProto.FLOAT  # positions < 2**24 are exact; ArgMax takes float on CPU
    nodes = [
        helper.make_node("Cast", ["position_ids"], [names["pos_f"]], to=float32),
        helper.make_node(
            "ArgMax", [names["pos_f"]], [names["last_col"]], axis=1, keepdims=1
        ),  # [R, 1], the first index of the maximum
        helper.make_node("GatherND", [hidden, names["last_col"]], [names["h_rh"]], batch_dims=1),
        helper.make_node("Unsqueeze", [names["h_rh"], axes], [names["h_r1h"]]),
    ]
    head.input[0] = names["h_r1h"]
    at = list(g.node).index(head)
    for k, node in enumerate(nodes):
        g.node.insert(at + k, node)
    out = next(o for o in g.output if o.name == "logits")
    out.type.tensor_type.shape.dim[1].ClearField("dim_param")
    out.type.tensor_type.shape.dim[1].dim_value = 1
    return True


class LastLogitsStepper(StaticStepper):
    """A StaticStepper over a graph rewritten by `last_position_logits`: logits_R1V."""

    def run(
        self, ids_RS: np.ndarray, pos_RS: np.ndarray, index_R: np.ndarray, lo: int = 0
    ) -> np.ndarray:
        """One call over slots [lo, lo + R), written in place; logits_R1V (a reused buffer)."""
        rows = ids_RS.shape[0]
        logits_R1V = self._logits[: rows * self.vocab].reshape(rows, 1, self.vocab)
        binding = self._binding(lo, lo + rows)
        for name, value in zip(self.layout.leading_inputs, (ids_RS, pos_RS, index_R), strict=True):
            binding.bind_cpu_input(name, value)
        binding.bind_output(
            "logits", "cpu", 0, self.logits_dtype, logits_R1V.shape, logits_R1V.ctypes.data
        )
        self.session.run_with_iobinding(binding)
        self.last_binding = (binding, lo)
        return logits_R1V


class OrtSlotBackend(SlotRunner):
    """A static-layout model.onnx with `slots` rows of preallocated, in-place K/V buffers."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        slots: int = 4,
        device: str = "auto",
        threads: int = 0,
        profile_dir: Path | None = None,
        log_severity: int = 3,
        spin: bool = True,
        last_only: bool = True,
    ) -> None:
        # spin=False on a shared host (the server): see kiln/graph_io.py ort_session.
        source: Any = onnx_path
        self.last_only = False
        if last_only and _graph_bytes(onnx_path) < _PROTO_LIMIT:
            import onnx

            model = onnx.load(str(onnx_path))
            if "position_ids" in [i.name for i in model.graph.input] and last_position_logits(
                model
            ):
                source, self.last_only = model.SerializeToString(), True
            del model
        session = ort_session(
            source,
            device=device,
            threads=threads,
            spin=spin,
            profile_dir=profile_dir,
            log_severity=log_severity,
        )
        if layout_of_inputs([i.name for i in session.get_inputs()]) is not STATIC:
            raise ArtifactError(
                f"{onnx_path} is a concat-KV graph (no write_index input); the slot backend needs "
                "a static one: re-export with `kiln export MODEL --kv static --max-context N`."
            )
        stepper = LastLogitsStepper if self.last_only else StaticStepper
        self.stepper = stepper(session, rows=max(slots, 1))
        super().__init__(
            slots=slots, max_context=self.stepper.max_context, vocab=self.stepper.vocab
        )
        self.session = session
        self.past_names = self.stepper.past_names
        self.present_names = self.stepper.present_names
        self.kv_dtype = self.stepper.kv_dtype
        self.device = self.stepper.device
        self.name = f"onnxruntime-{self.device}-static"
        self.logits_dtype = self.stepper.logits_dtype  # float16 for an fp16 export
        log.debug(
            "static KV: %d slots x %d positions, %.1f MiB",
            slots,
            self.max_context,
            self.kv_bytes / 2**20,
        )

    @property
    def buffers(self) -> list[Any]:
        """The K/V buffers (OrtValues), one per past input, allocated once at load."""
        return self.stepper.buffers

    @property
    def kv_bytes(self) -> int:
        """Bytes held by all K/V buffers (allocated once at load)."""
        return self.stepper.kv_bytes

    def buffer_ptrs(self) -> list[int]:
        """Device addresses of the K/V buffers (the past of every step, by design)."""
        return self.stepper.buffer_ptrs()

    def present_ptrs(self) -> list[int]:
        """Addresses ORT wrote the last step's presents to, at slot 0 of the bound range."""
        return self.stepper.present_ptrs()

    def read_slot(self, slot: int, index: int) -> np.ndarray:
        """Host copy of one slot of K/V buffer `index` [Hkv, M, D] (tests and debugging)."""
        self.length(slot)  # range check
        return np.array(self.buffers[index].numpy()[slot])  # a copy

    def end_profiling(self) -> str | None:
        """Stop ORT's profiler (when enabled) and return the JSON trace path."""
        opts = self.session.get_session_options()
        return self.session.end_profiling() if opts.enable_profiling else None

    def _execute(
        self, call: SlotCall, ids: np.ndarray, pos: np.ndarray, index: np.ndarray, pick: np.ndarray
    ) -> np.ndarray:
        """One graph call over slots [lo, hi); logits_NV at each fed slot's last token."""
        if self.last_only and len(pick) > len(set(pick[:, 0].tolist())):
            raise KilnError(
                "This backend computes logits at each row's last position only, and a step "
                "asked for several per row (a speculative verify pass); load the artifact with "
                "last_only=False (kiln.runtime.load) to verify drafts."
            )
        logits_RSV = self.stepper.run(ids, pos, index, lo=call.lo)  # S = 1 when last_only
        col = 0 if self.last_only else pick[:, 1]
        logits_NV: np.ndarray = logits_RSV[pick[:, 0], col]  # numpy types fancy indexing Any
        return logits_NV.astype(np.float32, copy=False)
