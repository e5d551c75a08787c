"""runtime/cuda_mem.py on a real GPU: the copies the TensorRT backends make, byte for byte.

The TensorRT engines kiln builds run only on their GPU generations, but these device buffers,
streams and copies (KV zeroing, feeds in, logits rows out through pitched 2D copies,
runtime/trt_slots.py) need only a CUDA driver. Skips on a host without one.
"""

from __future__ import annotations

import numpy as np
import pytest

from kiln.runtime.cuda_mem import CudaError, DeviceBuffer, Stream, gpu_compute_capability

pytestmark = pytest.mark.skipif(gpu_compute_capability() is None, reason="needs a CUDA GPU")


def test_round_trip_and_memset_are_exact():
    host = np.random.default_rng(0).standard_normal((3, 1000)).astype(np.float32)
    buf, stream = DeviceBuffer(host.nbytes), Stream()
    stream.to_device(buf.ptr, host)
    back = np.empty_like(host)
    stream.to_host(back, buf.ptr)
    stream.synchronize()
    assert np.array_equal(back, host)
    stream.memset(buf.ptr, 0, host.nbytes // 2)  # the first half only
    stream.to_host(back, buf.ptr)
    stream.synchronize()
    flat, orig = back.reshape(-1), host.reshape(-1)
    assert not flat[: flat.size // 2].any() and np.array_equal(
        flat[flat.size // 2 :], orig[flat.size // 2 :]
    )


@pytest.mark.parametrize("rows,width,vocab,pick", [(4, 7, 96, 6), (8, 1, 49152, 0)])
def test_pitched_copy_gathers_one_position_per_row(rows, width, vocab, pick):
    """The logits gather of a slot call: position `pick` of each row of [rows, width, vocab]."""
    logits = np.random.default_rng(1).standard_normal((rows, width, vocab)).astype(np.float32)
    buf, stream = DeviceBuffer(logits.nbytes), Stream()
    stream.to_device(buf.ptr, logits)
    out = np.empty((rows, vocab), np.float32)
    item = logits.itemsize
    stream.to_host_2d(
        out, buf.ptr + pick * vocab * item, src_pitch=width * vocab * item,
        row_bytes=vocab * item, rows=rows,
    )  # fmt: skip
    stream.synchronize()
    assert np.array_equal(out, logits[:, pick])
    assert not np.array_equal(out, logits[:, (pick + 1) % width]) or width == 1  # control


def test_compute_capability_is_the_driver_s():
    import subprocess

    cc = gpu_compute_capability()
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
        capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    assert cc is not None and f"{cc[0]}.{cc[1]}" == smi


def test_a_failed_call_raises_naming_it():
    with pytest.raises(
        CudaError, match=r"cudaMalloc\(1125899906842624\) failed: cudaErrorMemoryAllocation"
    ):
        DeviceBuffer(2**50)  # 1 PiB
