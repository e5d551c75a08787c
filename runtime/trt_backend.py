"""TensorRT / TensorRT-RTX backend: an engine.plan run with device buffers from cuda-python.

The engine is chosen by its engine.json (compute capability and library version, checked with
kiln.engine.manifest); an engine cannot be inspected without a GPU, so the manifest's shape
ranges are the source of truth. One execution context per optimization profile (prefill,
decode), each bound to its profile once. Each cache allocates its KV buffers once at the max
context (runtime/concat_slots.py holds one batch-1 cache per slot): past is read from one set
and present written to the other, then the two swap, so a step allocates nothing and copies no
cache. Only the last position's logits come back to the host. On TensorRT-RTX,
`cuda_graph=True` sets the runtime's whole-graph capture strategy for the decode context, and
JIT-compiled kernels persist in a runtime cache file.

Static-KV engines (`kiln export --kv static`, then `kiln build`) run through TrtSlotBackend, a
`kiln.runtime.slots.SlotBackend`: one `[slots, Hkv, max_context, D]` buffer per past input,
bound as both past and present (IKVCacheUpdateLayer writes in place); the host-side step loop
is runtime/slots.py's SlotRunner (trt_slots.py adds the engine's limits). NOT RUN here (no
GPU): `make gpu-check` runs both backends on a GPU host.

Letters in names: B batch, S new tokens, P past, T = P + S, Hkv KV heads, D head dim, V vocab.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import KilnError
from kiln.layouts import CONCAT, STATIC
from kiln.manifests import EngineManifest
from kiln.runtime.artifact import ArtifactInfo
from kiln.runtime.cuda_mem import DeviceBuffer, Stream, gpu_compute_capability

if TYPE_CHECKING:  # trt_slots imports this module
    from kiln.runtime.trt_slots import TrtSlotBackend

log = logging.getLogger(__name__)

LIBRARIES = ("tensorrt_rtx", "tensorrt")  # module names, as engine.json's library.name
_LOGGERS: dict[str, Any] = {}


def np_dtype(name: str) -> Any:
    """The numpy dtype of an engine.json dtype name (bfloat16 through ml_dtypes)."""
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def select_engine(
    engines: tuple[Path, ...] | list[Path],
    compute_capability: tuple[int, int],
    library: str,
    version: str,
) -> tuple[Path, EngineManifest]:
    """The first engine folder whose manifest matches this GPU and library, or a clear error."""
    from kiln.engine.errors import EngineMismatchError
    from kiln.engine.manifest import engine_mismatches, read_engine

    problems = []
    for folder in engines:
        manifest = read_engine(folder)
        why = engine_mismatches(manifest, compute_capability, library, version)
        if not why:
            return folder, manifest
        problems.append(f"  {folder}: " + "; ".join(why))
    cc = f"{compute_capability[0]}.{compute_capability[1]}"
    raise EngineMismatchError(
        f"No engine here can run on this GPU (compute capability {cc}, {library} {version}):\n"
        + "\n".join(problems)
        + f"\nBuild one with `kiln build ARTIFACT --profile P` for a GPU profile targeting {cc} "
        "(models/gpus/), or run the ONNX artifact with ONNX Runtime."
    )


def backend_from_engines(info: ArtifactInfo, *, cuda_graph: bool = False) -> TrtBackend:
    """Pick the engine for this GPU and library, deserialize it, allocate its buffers."""
    trt, folder, manifest = _engine_for_this_gpu(info, static=False)
    return TrtBackend(folder, manifest, trt, cuda_graph=cuda_graph)


def slot_backend_from_engines(
    info: ArtifactInfo, *, slots: int = 4, cuda_graph: bool = False
) -> TrtSlotBackend:
    """The static-KV engine for this GPU and library as a SlotBackend with `slots` rows."""
    from kiln.runtime.trt_slots import TrtSlotBackend

    trt, folder, manifest = _engine_for_this_gpu(info, static=True)
    return TrtSlotBackend(folder, manifest, trt, slots=slots, cuda_graph=cuda_graph)


def _engine_for_this_gpu(info: ArtifactInfo, *, static: bool) -> tuple[Any, Path, EngineManifest]:
    """(library module, engine folder, manifest) of the engine this GPU and library can run."""
    layout = (STATIC if static else CONCAT).name
    engines = [d for d in info.engines if _layout(_manifest(d)) == layout]
    if not engines:
        have = sorted({_layout(_manifest(d)) for d in info.engines})
        raise KilnError(
            f"{info.path} holds only {', '.join(have)}-KV engines, not {layout} ones; load it with "
            f"kiln.runtime.load, or build a {layout} engine (`kiln export --kv {layout}` then "
            "`kiln build`)."
        )
    cc = gpu_compute_capability()
    if cc is None:
        raise KilnError(
            f"{info.path} holds TensorRT engines, which need an NVIDIA GPU with a CUDA driver; "
            "none is visible here. Run the ONNX artifact with ONNX Runtime instead "
            "(`kiln generate ONNX_FOLDER`), or use a GPU machine (`make gpu-check`)."
        )
    wanted = {_manifest(d).library["name"] for d in engines}
    trt = None
    for name in [n for n in LIBRARIES if n in wanted]:
        try:
            trt = importlib.import_module(name)
            break
        except ImportError:
            continue
    if trt is None:
        raise KilnError(
            f"The engines in {info.path} were built with {', '.join(sorted(wanted))}, which is "
            "not installed; install it or rebuild the engines with the installed library."
        )
    folder, manifest = select_engine(engines, cc, trt.__name__, trt.__version__)
    return trt, folder, manifest


def _manifest(folder: Path) -> EngineManifest:
    from kiln.engine.manifest import read_engine

    return read_engine(folder, verify=False)


def _layout(manifest: EngineManifest) -> str:
    return str(manifest.kv_cache["layout"])


def deserialize_plan(trt: Any, folder: Path) -> tuple[Any, Any]:
    """(runtime, engine) of folder/engine.plan; the runtime must outlive the engine."""
    # One logger per library for the process: the runtime keeps using it after this returns.
    logger = _LOGGERS.setdefault(trt.__name__, trt.Logger(trt.Logger.WARNING))
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine((folder / "engine.plan").read_bytes())
    if engine is None:
        raise KilnError(
            f"{trt.__name__} could not deserialize {folder / 'engine.plan'} (see the log "
            "above); rebuild it with `kiln build --force` on this library version."
        )
    return runtime, engine


def new_context(
    engine: Any, trt: Any, index: int, stream: Stream, cache: Any = None, cuda_graph: bool = False
) -> Any:
    """An execution context on optimization profile `index` (RTX: with the runtime cache)."""
    if trt.__name__ == "tensorrt_rtx":
        rc = engine.create_runtime_config()
        if cache is not None:
            rc.set_runtime_cache(cache)
        if cuda_graph:
            rc.cuda_graph_strategy = trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        ctx = engine.create_execution_context(rc)
    else:
        ctx = engine.create_execution_context()
    ctx.set_optimization_profile_async(index, stream.ptr)
    return ctx


def set_shape(ctx: Any, name: str, shape: tuple[int, ...]) -> None:
    """Set one input's shape for the next call, or raise naming the input and the shape."""
    if not ctx.set_input_shape(name, shape):
        raise KilnError(
            f"TensorRT rejected shape {shape} for input {name!r} in optimization profile "
            f"{ctx.active_optimization_profile}; the engine's shape ranges are in engine.json."
        )


class DeviceKVCache:
    """Concat-layout cache of `batch` rows: two preallocated buffer sets (past/present).

    Past is read from one set and present written to the other, then the two swap, so a call
    allocates nothing and copies no cache. Each cache owns its buffers (one per slot of
    runtime/concat_slots.py), sized for the engine's max context.
    """

    def __init__(self, backend: TrtBackend, batch: int) -> None:
        be = backend
        nbytes = batch * be.kv_heads * be.max_context * be.head_dim * be.kv_itemsize
        self.kv = [[DeviceBuffer(nbytes) for _ in be.past_names] for _ in range(2)]
        self.batch = batch
        self.cur = 0  # which buffer set holds the past
        self._length = 0

    @property
    def length(self) -> int:
        """Positions held per row."""
        return self._length

    def past_ptrs(self) -> list[int]:
        """Device addresses of the past tensors (read this step)."""
        return [b.ptr for b in self.kv[self.cur]]

    def present_ptrs(self) -> list[int]:
        """Device addresses the present tensors are written to."""
        return [b.ptr for b in self.kv[1 - self.cur]]

    def advance(self, new: int) -> None:
        """The present just written becomes the past."""
        self.cur ^= 1
        self._length += new


class TrtBackend:
    """A deserialized engine with its contexts, stream and preallocated buffers."""

    def __init__(
        self, folder: Path, manifest: EngineManifest, trt: Any, *, cuda_graph: bool = False
    ) -> None:
        self.trt = trt
        self.folder = folder
        self.manifest = manifest
        self.name = f"{trt.__name__}-{manifest.profile_name}"
        self.is_rtx = trt.__name__ == "tensorrt_rtx"
        self._runtime, self.engine = deserialize_plan(trt, folder)
        self.profiles = manifest.optimization_profiles
        self.max_context = min(p["axes"]["total_sequence"][2] for p in self.profiles)
        io = {v["name"]: v for v in manifest.io["inputs"] + manifest.io["outputs"]}
        self.past_names = [n for n in io if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        first = io[self.past_names[0]]
        self.kv_heads, self.head_dim = int(first["shape"][1]), int(first["shape"][3])
        self.kv_dtype = np_dtype(first["dtype"])
        self.kv_itemsize = np.dtype(self.kv_dtype).itemsize
        self.logits_dtype = np_dtype(io["logits"]["dtype"])
        self.vocab = int(io["logits"]["shape"][-1])
        self.stream = Stream()
        self._runtime_cache_path = folder / "runtime.cache"
        self._runtime_cache = None
        if cuda_graph and not self.is_rtx:
            # A hand-made capture would be re-recorded every step: concat-KV shapes grow by one
            # position per step; static-KV engines (runtime/trt_slots.py) keep their shapes fixed.
            log.warning("cuda_graph: only TensorRT-RTX's runtime capture is wired; ignored here")
        self.contexts = [
            self._context(p, cuda_graph and p["name"] == "decode") for p in self.profiles
        ]
        self.stream.synchronize()  # profile switches are enqueued on the stream
        self._allocate()

    def _context(self, profile: dict[str, Any], cuda_graph: bool) -> Any:
        if self.is_rtx and self._runtime_cache is None:
            self._runtime_cache = load_runtime_cache(self.engine, self._runtime_cache_path)
        return new_context(
            self.engine,
            self.trt,
            int(profile["index"]),
            self.stream,
            self._runtime_cache,
            cuda_graph,
        )

    def _allocate(self) -> None:
        """Every input and output buffer a step needs but the caches, at the largest size."""
        b, t = self.max_batch_any, self.max_context
        self.ids = DeviceBuffer(b * t * 8)
        self.mask = DeviceBuffer(b * t * 8)
        self.pos = DeviceBuffer(b * t * 8)
        seq = max(p["axes"]["sequence"][2] * p["axes"]["batch"][2] for p in self.profiles)
        self.logits = DeviceBuffer(seq * self.vocab * np.dtype(self.logits_dtype).itemsize)
        log.info(
            "%s: input buffers for batch %d x context %d, logits %.1f MiB",
            self.name,
            b,
            t,
            self.logits.nbytes / 2**20,
        )

    @property
    def max_batch_any(self) -> int:
        """Largest batch of any profile (buffers are sized for it)."""
        return max(int(p["axes"]["batch"][2]) for p in self.profiles)

    def new_cache(self, batch: int) -> DeviceKVCache:
        """An empty cache of `batch` rows with its own device buffers."""
        return DeviceKVCache(self, batch)

    def _profile(self, b: int, s: int, p: int, t: int) -> int:
        order = sorted(
            range(len(self.profiles)),
            key=lambda i: (self.profiles[i]["name"] != ("decode" if s == 1 else "prefill"), i),
        )
        for i in order:
            ax = self.profiles[i]["axes"]
            if all(
                ax[k][0] <= v <= ax[k][2]
                for k, v in (
                    ("batch", b),
                    ("sequence", s),
                    ("past_sequence", p),
                    ("total_sequence", t),
                )
            ):
                return i
        raise KilnError(
            f"No optimization profile of engine {self.folder} accepts batch {b}, {s} new tokens "
            f"over {p} cached (profiles: "
            + "; ".join(f"{q['name']} {q['axes']}" for q in self.profiles)
            + "); shorten the input or rebuild with larger shape ranges."
        )

    def forward(
        self, ids_BS: np.ndarray, mask_BT: np.ndarray, pos_BS: np.ndarray, cache: DeviceKVCache
    ) -> np.ndarray:
        """One engine call on the stream; returns host float32 logits_BV of the last position."""
        b, s = ids_BS.shape
        t, p = mask_BT.shape[1], cache.length
        ctx = self.contexts[self._profile(b, s, p, t)]
        st = self.stream
        st.to_device(self.ids.ptr, ids_BS.astype(np.int64))
        st.to_device(self.mask.ptr, mask_BT.astype(np.int64))
        st.to_device(self.pos.ptr, pos_BS.astype(np.int64))
        for name, shape, ptr in (
            ("input_ids", (b, s), self.ids.ptr),
            ("attention_mask", (b, t), self.mask.ptr),
            ("position_ids", (b, s), self.pos.ptr),
        ):
            set_shape(ctx, name, shape)
            ctx.set_tensor_address(name, ptr)
        kv_shape = (b, self.kv_heads, p, self.head_dim)
        for name, ptr in zip(self.past_names, cache.past_ptrs(), strict=True):
            set_shape(ctx, name, kv_shape)
            ctx.set_tensor_address(name, ptr)
        for name, ptr in zip(self.present_names, cache.present_ptrs(), strict=True):
            ctx.set_tensor_address(name, ptr)
        ctx.set_tensor_address("logits", self.logits.ptr)
        if not ctx.execute_async_v3(self.stream.ptr):
            raise KilnError(f"TensorRT execution failed for batch {b}, {s} new, {p} past.")
        item = np.dtype(self.logits_dtype).itemsize
        out = np.empty((b, self.vocab), self.logits_dtype)
        st.to_host_2d(
            out,
            self.logits.ptr + (s - 1) * self.vocab * item,
            src_pitch=s * self.vocab * item,
            row_bytes=self.vocab * item,
            rows=b,
        )
        st.synchronize()
        cache.advance(s)
        return out.astype(np.float32)

    def save_runtime_cache(self) -> None:
        """Persist TensorRT-RTX's JIT-compiled kernels beside the engine (best effort)."""
        save_runtime_cache_file(self._runtime_cache, self._runtime_cache_path)


def load_runtime_cache(engine: Any, path: Path) -> Any:
    """TensorRT-RTX's runtime cache of JIT-compiled kernels, seeded from `path` if present."""
    cache = engine.create_runtime_config().create_runtime_cache()
    if path.is_file():
        cache.deserialize(path.read_bytes())
    return cache


def save_runtime_cache_file(cache: Any, path: Path) -> None:
    """Write the runtime cache to `path` atomically; a failure only warns (it is a cache)."""
    if cache is None:
        return
    try:
        data = bytes(cache.serialize())
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        log.warning("could not save the runtime cache to %s: %s", path, e)
