"""The static cache is updated in place: present is past's buffer, and ORT copies nothing.

Evidence from ONNX Runtime itself: (1) the present OrtValues it returns sit at the past
buffers' addresses, and (2) its TensorScatter kernel logs "in-place optimization not activated,
copying past_cache to present_cache (N bytes)" at WARNING whenever destination != source
(onnxruntime/core/providers/cpu/llm/tensorscatter.cc). The control binds present elsewhere.
"""

from __future__ import annotations

import numpy as np

from kiln.runtime.ort_slots import OrtSlotBackend, scatter_copy_bytes
from kiln.runtime.slots import SlotFeed


def _backend(exported, slots=3):
    onnx = exported("llama", "fp32", kv="static") / "model.onnx"
    return OrtSlotBackend(onnx, slots=slots, log_severity=1)  # WARNING: the copy message shows


def test_present_is_past_and_nothing_is_copied(exported, capfd):
    backend = _backend(exported)
    ptrs = backend.buffer_ptrs()
    plan = [
        [SlotFeed(0, [1, 5, 6, 7], restart=True), SlotFeed(2, [1, 9], restart=True)],
        [SlotFeed(0, [3]), SlotFeed(2, [4])],  # decode over 0..2 with slot 1 idle
        [SlotFeed(1, [1, 2, 3, 4, 5, 6], restart=True)],  # a range starting mid-buffer
        [SlotFeed(1, [3])],
    ]
    capfd.readouterr()
    for feeds in plan:
        backend.step(feeds)
        assert backend.present_ptrs() == ptrs
        assert backend.buffer_ptrs() == ptrs  # never reallocated
    err = capfd.readouterr().err
    assert "in-place optimization not activated" not in err
    assert scatter_copy_bytes(err) == 0


def test_negative_control_separate_present_is_copied(exported, capfd):
    """Present bound to ORT-allocated outputs: the kernel copies each whole buffer."""
    backend = _backend(exported, slots=2)
    binding = backend.session.io_binding()
    binding.bind_cpu_input("input_ids", np.array([[1, 2], [1, 3]]))
    binding.bind_cpu_input("position_ids", np.array([[0, 1], [0, 1]]))
    binding.bind_cpu_input("write_index", np.array([0, 0]))
    for name, value in zip(backend.past_names, backend.buffers, strict=True):
        binding.bind_ortvalue_input(name, value)
    for name in backend.present_names:
        binding.bind_output(name, "cpu")
    binding.bind_output("logits", "cpu")
    capfd.readouterr()
    backend.session.run_with_iobinding(binding)
    err = capfd.readouterr().err
    outs = binding.get_outputs()
    assert [v.data_ptr() for v in outs[: len(backend.present_names)]] != backend.buffer_ptrs()
    assert "in-place optimization not activated" in err
    assert scatter_copy_bytes(err) == backend.kv_bytes  # every buffer, whole
