"""Device memory, copies and a stream through cuda-python (`cuda-bindings`), not PyTorch.

A serving image for TensorRT engines then needs no torch. Every call checks its cudaError and
raises a KilnError naming the call. Only the few runtime-API calls the TensorRT backend needs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from kiln.errors import KilnError


class CudaError(KilnError):
    """A CUDA runtime call failed (no GPU, no driver, out of memory, ...)."""


def cudart() -> Any:
    """The cuda-python runtime module, or a KilnError saying which extra installs it."""
    try:
        from cuda.bindings import runtime
    except ImportError as e:
        raise CudaError(
            "The TensorRT backend needs cuda-python (cuda-bindings); install kiln's engine "
            "extra: pip install -e '.[engine]'."
        ) from e
    return runtime


def check(result: Any, call: str) -> Any:
    """Unwrap a cuda-python `(err, *values)` tuple; raise CudaError on failure."""
    rt = cudart()
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != rt.cudaError_t.cudaSuccess:
        raise CudaError(f"{call} failed: {err.name} ({int(err)}).")
    return values[0] if len(values) == 1 else tuple(values) or None


def gpu_compute_capability(device: int = 0) -> tuple[int, int] | None:
    """(major, minor) of the GPU, or None when no usable CUDA device and driver are present."""
    try:
        rt = cudart()
    except CudaError:
        return None
    err, count = rt.cudaGetDeviceCount()
    if err != rt.cudaError_t.cudaSuccess or count <= device:
        return None
    props = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    return int(props.major), int(props.minor)


class DeviceBuffer:
    """One cudaMalloc allocation, freed with the object (or explicitly)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(int(nbytes), 1)  # zero-size tensors still need a valid address
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"))

    def free(self) -> None:
        """Release the allocation (idempotent)."""
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at shutdown the driver may already be gone
            self.free()


class Stream:
    """A CUDA stream with the copies the backend uses; all copies are async on it."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")
        self._pending: list[np.ndarray] = []  # host sources of queued copies

    @property
    def ptr(self) -> int:
        """The stream handle as an integer (what TensorRT's execute_async_v3 takes)."""
        return int(self.handle)

    def to_device(self, dst: int, host: np.ndarray) -> None:
        """Copy a contiguous host array to device address `dst`."""
        host = np.ascontiguousarray(host)
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, self.handle), "H2D")
        self._pending.append(host)  # the source must outlive the async copy

    def to_host(self, host: np.ndarray, src: int) -> None:
        """Copy `host.nbytes` bytes from device address `src` into the contiguous `host`."""
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, self.handle), "D2H")

    def memset(self, dst: int, value: int, nbytes: int) -> None:
        """Fill `nbytes` at device address `dst` with the byte `value` (zeroing KV buffers)."""
        check(cudart().cudaMemsetAsync(dst, value, nbytes, self.handle), "cudaMemsetAsync")

    def to_host_2d(
        self, host: np.ndarray, src: int, *, src_pitch: int, row_bytes: int, rows: int
    ) -> None:
        """Copy `rows` rows of `row_bytes` each, `src_pitch` apart on the device, into `host`."""
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(
            rt.cudaMemcpy2DAsync(
                host.ctypes.data, row_bytes, src, src_pitch, row_bytes, rows, kind, self.handle
            ),
            "D2H 2D",
        )

    def synchronize(self) -> None:
        """Wait for everything queued on the stream."""
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")
        self._pending.clear()
