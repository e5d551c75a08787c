"""The ONNX I/O contract of a kiln graph, in one place: every stage that runs a graph drives it.

- `positions`: the position rule (count of real tokens before each column, as transformers);
- `io_signature`: names, dtypes and symbolic shapes, as the manifests record them;
- `ort_session`: the one ONNX Runtime session factory (export check, optimize probe, runtime);
- one stepper per KV layout (kiln/layouts.py), the only code that feeds a graph call:
  `ConcatStepper` (past in, present out; IO binding keeps the cache as OrtValues for the runtime)
  and `StaticStepper` (slot buffers bound as both past and present, written in place). Both also
  offer the same numpy surface for checks: `reset`, `feed`, `append`, `cache`, `load_cache`.

numpy is the only import at module level: onnx, onnxruntime and onnx-ir load when first used.
Letters: B rows, S new tokens, P past length, T = P + S, M max_context, Hkv KV heads, D head dim,
V vocab, R rows of one slot call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError
from kiln.layouts import CONCAT, STATIC, KVLayout, layout_of_inputs

# ONNX Runtime's type strings for the tensors kiln graphs exchange with the host.
NP_DTYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
}
# ORT's graph optimization levels by name; "off" runs the graph as written (the optimize probe).
OPTIMIZATION_LEVELS = ("off", "basic", "extended", "all")


def positions(mask_BT: np.ndarray) -> np.ndarray:
    """Position of every column: count of real tokens before it; padding gets 1 as in HF."""
    pos = np.cumsum(mask_BT, axis=1) - 1
    return np.where(mask_BT == 0, 1, pos).astype(np.int64)


def np_dtype(ort_type: str) -> type[np.generic]:
    """The numpy dtype of an ONNX Runtime tensor type string ('tensor(float16)' -> float16)."""
    try:
        return NP_DTYPES[ort_type]
    except KeyError:
        raise ArtifactError(
            f"graph tensor type {ort_type} has no host dtype in kiln; ONNX Runtime runs fp32 and "
            "fp16 graphs (bf16 ones through their fp32 emulation)."
        ) from None


def io_signature(onnx_path: Path) -> dict[str, list[dict[str, Any]]]:
    """Names, dtypes and symbolic shapes of the graph's inputs and outputs (weights not loaded)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)

    def describe(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        bf16 = t.elem_type == onnx.TensorProto.BFLOAT16  # numpy has no bfloat16
        return {
            "name": v.name,
            "dtype": "bfloat16" if bf16 else onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
        }

    return {
        "inputs": [describe(v) for v in proto.graph.input],
        "outputs": [describe(v) for v in proto.graph.output],
    }


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


def ort_session(
    source: Path | str | bytes | Any,
    *,
    device: str = "cpu",
    threads: int = 0,
    spin: bool = True,
    profile_dir: Path | None = None,
    optimization: str = "all",
    log_severity: int = 3,
) -> Any:
    """An ONNX Runtime session over a model file, serialized bytes or an in-memory `ir.Model`.

    `spin`: intra-op threads spin between ops (ORT's default): faster on an idle host (smollm
    static decode +27% on 2 quiet cores), about half as fast when anything else needs the CPU
    (86 -> 47 ms per step at load 5), so the server turns it off. `optimization="off"` runs the
    graph as written: ORT's own fusions would otherwise turn an unfused and a fused graph into
    the same kernels and hide a pass's drift (the optimize probe).
    """
    import onnxruntime as ort

    levels = dict(
        zip(
            OPTIMIZATION_LEVELS,
            (
                ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            ),
            strict=True,
        )
    )
    device = resolve_device(device)
    opts = ort.SessionOptions()
    opts.log_severity_level = log_severity
    opts.graph_optimization_level = levels[optimization]
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if profile_dir is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(profile_dir) / "ort_profile")
    if isinstance(source, (str, Path)):
        model: Any = str(source)
    elif isinstance(source, bytes):
        model = source
    else:  # an onnx_ir.Model
        import onnx_ir as ir

        model = ir.serde.serialize_model(source).SerializeToString()
    providers = ["CUDAExecutionProvider"] if device == "cuda" else []
    return ort.InferenceSession(model, opts, providers=[*providers, "CPUExecutionProvider"])


def session_device(session: Any) -> str:
    """'cuda' when the session runs on CUDA, else 'cpu' (where OrtValues must live)."""
    return "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"


class _Graph:
    """What both steppers read from a session: the layout's names, K/V dtype and shape, vocab."""

    layout: KVLayout

    def __init__(self, session: Any) -> None:
        self.session = session
        self.device = session_device(session)
        inputs = {i.name: i for i in session.get_inputs()}
        names = list(inputs)
        if layout_of_inputs(names) is not self.layout:
            raise ArtifactError(
                f"graph inputs {names[:3]} are not the {self.layout.name} KV layout "
                f"{list(self.layout.leading_inputs)}; load the graph with the stepper of its "
                "layout (kiln.graph_io.stepper) or re-export it."
            )
        layers = (len(names) - len(self.layout.leading_inputs)) // 2
        outputs = session.get_outputs()
        if names != self.layout.input_names(layers) or [
            o.name for o in outputs
        ] != self.layout.output_names(layers):
            raise ArtifactError(
                f"graph I/O {names} -> {[o.name for o in outputs]} is not kiln's "
                f"{self.layout.name} contract for {layers} layers; re-export the model with "
                "`kiln export`."
            )
        self.layers = layers
        self.past_names = names[len(self.layout.leading_inputs) :]
        self.present_names = [o.name for o in outputs[1:]]
        first = inputs[self.past_names[0]]
        self.kv_dtype = np_dtype(first.type)
        self.kv_shape = tuple(first.shape)  # [B, Hkv, P or M, D], symbolic where dynamic
        self.vocab = int(outputs[0].shape[-1])
        self.logits_dtype = np_dtype(outputs[0].type)


class ConcatStepper(_Graph):
    """Calls of a concat-layout graph: ids, mask, positions and past in; logits and present out.

    The runtime path (`run_bound`) binds past OrtValues as inputs and keeps the presents on the
    device, so the cache is never copied to the host between steps; only logits come back.
    Checks use `run` (numpy in, numpy out) or the stateful numpy surface (`reset`, `feed`, ...).
    """

    layout = CONCAT

    def __init__(self, session: Any, *, rows: int = 1) -> None:
        super().__init__(session)
        self.kv_heads, self.head_dim = int(self.kv_shape[1]), int(self.kv_shape[3])
        self.reset(rows)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        """Zero-length past arrays (a prefill reads P = 0)."""
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        return [empty for _ in self.past_names]

    def ortvalue(self, a: np.ndarray) -> Any:
        """`a` as an OrtValue on this session's device."""
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_numpy(a, self.device, 0)

    def run(
        self, ids_BS: np.ndarray, mask_BT: np.ndarray, pos_BS: np.ndarray, past: Sequence[Any]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call with numpy inputs (past cast to the graph's K/V dtype): logits_BSV, present."""
        feeds = dict(zip(self.layout.leading_inputs, (ids_BS, mask_BT, pos_BS), strict=True))
        for name, p in zip(self.past_names, past, strict=True):
            feeds[name] = np.asarray(p).astype(self.kv_dtype, copy=False)
        logits, *present = self.session.run(None, feeds)
        return logits, present

    def run_bound(
        self, ids_BS: np.ndarray, mask_BT: np.ndarray, pos_BS: np.ndarray, past: Sequence[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        """One call over past OrtValues: host logits_BSV and the presents as device OrtValues."""
        binding = self.session.io_binding()
        for name, value in zip(self.layout.leading_inputs, (ids_BS, mask_BT, pos_BS), strict=True):
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return logits.numpy(), present

    # The numpy surface for checks: one growing cache held here.

    def reset(self, rows: int) -> None:
        """Start `rows` new sequences with an empty cache."""
        self.past: list[np.ndarray] = self.empty_past(rows)

    def feed(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """One call on the leading inputs by name; the presents become the cache. logits_BSV."""
        ids, mask, pos = (inputs[name] for name in self.layout.leading_inputs)
        logits, self.past = self.run(ids, mask, pos, self.past)
        return logits.astype(np.float32)

    def append(self, ids_BS: np.ndarray, start: int) -> np.ndarray:
        """Feed unpadded rows whose cache holds `start` positions each; logits_BSV."""
        b, s = ids_BS.shape
        mask = np.ones((b, start + s), np.int64)
        pos = positions(mask)[:, start:]
        return self.feed({"input_ids": ids_BS, "attention_mask": mask, "position_ids": pos})

    def cache(self) -> list[np.ndarray]:
        """The K/V cache per past input, [B, Hkv, T, D]."""
        return list(self.past)

    def load_cache(self, arrays: Sequence[np.ndarray]) -> None:
        """Continue from another graph's cache (cast to this graph's K/V dtype)."""
        self.past = [np.asarray(a).astype(self.kv_dtype) for a in arrays]


class StaticStepper(_Graph):
    """Calls of a static-layout graph over `slots` rows of preallocated K/V buffers.

    The `[slots, Hkv, M, D]` buffers are allocated once and zeroed (masked positions must hold
    finite numbers: a NaN there would survive the mask), and bound by address as BOTH the past
    input and the present output of their layer. ONNX Runtime's TensorScatter kernel then sees
    destination == source and skips its cache copy (it logs "in-place optimization not
    activated, copying ... bytes" otherwise): a call allocates and copies nothing but new rows.
    Slots are the outermost axis, so a call over slots [lo, hi) binds pointer + lo * stride and
    slots outside the range cost nothing. Logits go to a preallocated host buffer.
    """

    layout = STATIC

    def __init__(self, session: Any, *, rows: int = 1) -> None:
        super().__init__(session)
        hkv, m, d = (int(x) for x in self.kv_shape[1:])
        self.row_shape = (hkv, m, d)
        self.max_context = m
        self.slot_bytes = hkv * m * d * np.dtype(self.kv_dtype).itemsize
        self._allocate(rows)

    def _allocate(self, slots: int) -> None:
        import onnxruntime as ort

        self.slots = slots
        # On CPU the OrtValue wraps (and keeps) its numpy array.
        self.buffers = [
            ort.OrtValue.ortvalue_from_numpy(
                np.zeros((slots, *self.row_shape), self.kv_dtype), self.device, 0
            )
            for _ in self.past_names
        ]
        self._logits = np.empty(slots * self.vocab, self.logits_dtype)  # grown for wide calls
        self._bindings: dict[tuple[int, int], Any] = {}
        self.last_binding: tuple[Any, int] | None = None

    @property
    def kv_bytes(self) -> int:
        """Bytes held by all K/V buffers."""
        return self.slot_bytes * self.slots * len(self.buffers)

    def _binding(self, lo: int, hi: int) -> Any:
        """IO binding of slots [lo, hi): past and present of each layer at the same address."""
        key = (lo, hi)
        if key not in self._bindings:
            binding = self.session.io_binding()
            shape = (hi - lo, *self.row_shape)
            for past, present, value in zip(
                self.past_names, self.present_names, self.buffers, strict=True
            ):
                ptr = value.data_ptr() + lo * self.slot_bytes
                binding.bind_input(past, self.device, 0, self.kv_dtype, shape, ptr)
                binding.bind_output(present, self.device, 0, self.kv_dtype, shape, ptr)
            self._bindings[key] = binding
        return self._bindings[key]

    def run(
        self, ids_RS: np.ndarray, pos_RS: np.ndarray, index_R: np.ndarray, lo: int = 0
    ) -> np.ndarray:
        """One call over slots [lo, lo + R), written in place; logits_RSV (a reused buffer)."""
        rows, s = ids_RS.shape
        if self._logits.size < rows * s * self.vocab:
            self._logits = np.empty(rows * s * self.vocab, self.logits_dtype)
        logits_RSV = self._logits[: rows * s * self.vocab].reshape(rows, s, self.vocab)
        binding = self._binding(lo, lo + rows)
        for name, value in zip(self.layout.leading_inputs, (ids_RS, pos_RS, index_R), strict=True):
            binding.bind_cpu_input(name, value)
        binding.bind_output(
            "logits", "cpu", 0, self.logits_dtype, logits_RSV.shape, logits_RSV.ctypes.data
        )
        self.session.run_with_iobinding(binding)
        self.last_binding = (binding, lo)
        return logits_RSV

    def buffer_ptrs(self) -> list[int]:
        """Device addresses of the K/V buffers (the past of every call, by design)."""
        return [v.data_ptr() for v in self.buffers]

    def present_ptrs(self) -> list[int]:
        """Addresses ORT wrote the last call's presents to, at slot 0 of the bound range."""
        assert self.last_binding is not None, "no call has run yet"
        binding, lo = self.last_binding
        outs = binding.get_outputs()[: len(self.present_names)]  # bound before the logits
        return [v.data_ptr() - lo * self.slot_bytes for v in outs]

    # The numpy surface for checks: the buffers are the cache.

    def reset(self, rows: int) -> None:
        """Zero the buffers (reallocated when `rows` is not the slot count)."""
        if rows != self.slots:
            self._allocate(rows)
            return
        for value in self.buffers:
            value.update_inplace(np.zeros((self.slots, *self.row_shape), self.kv_dtype))

    def feed(self, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """One call over every slot on the leading inputs by name; logits_BSV (float32 copy)."""
        ids, pos, index = (np.ascontiguousarray(inputs[n]) for n in self.layout.leading_inputs)
        return self.run(ids, pos, index).astype(np.float32)

    def append(self, ids_BS: np.ndarray, start: int) -> np.ndarray:
        """Feed unpadded rows that each hold `start` positions; logits_BSV."""
        b, s = ids_BS.shape
        pos = np.broadcast_to(np.arange(start, start + s, dtype=np.int64), (b, s))
        index = np.full(b, start, np.int64)
        return self.feed({"input_ids": ids_BS, "position_ids": pos, "write_index": index})

    def cache(self) -> list[np.ndarray]:
        """Host copies of the K/V buffers, [slots, Hkv, M, D]."""
        return [v.numpy().copy() for v in self.buffers]

    def load_cache(self, arrays: Sequence[np.ndarray]) -> None:
        """Overwrite the buffers with another graph's (cast to this graph's K/V dtype)."""
        for value, a in zip(self.buffers, arrays, strict=True):
            value.update_inplace(np.ascontiguousarray(a, dtype=self.kv_dtype))


Stepper = ConcatStepper | StaticStepper
_STEPPERS: dict[str, type[ConcatStepper] | type[StaticStepper]] = {
    CONCAT.name: ConcatStepper,
    STATIC.name: StaticStepper,
}


def stepper(source: Any, *, rows: int = 1, **session_options: Any) -> Stepper:
    """The stepper of a graph's layout (read from its inputs) over a session or model source.

    `source` is an ORT session or anything `ort_session` opens (with `session_options`);
    `rows` is the static layout's slot count and the concat layout's first batch size.
    """
    session = source if hasattr(source, "get_inputs") else ort_session(source, **session_options)
    layout = layout_of_inputs([i.name for i in session.get_inputs()])
    return _STEPPERS[layout.name](session, rows=rows)
