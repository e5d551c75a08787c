"""The slot backend over `kiln optimize --target onnxruntime` (GroupQueryAttention on the buffers).

The optimized static graph keeps the export's I/O (write_index, past = present buffers), so the
same backend runs it; GQA writes K/V into the bound buffer itself (past_present_share_buffer).
"""

from __future__ import annotations

import pytest
import torch
import transformers as T

from kiln.runtime import load
from kiln.runtime.slots import SlotFeed

PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 9], [1, 20, 30, 31], [1, 3, 4]]


@pytest.fixture(scope="module")
def ort_fp32(exported, tmp_path_factory):
    from kiln.optimize import optimize_model

    out = tmp_path_factory.mktemp("rt-static-ort") / "optimized"
    static = exported("llama", "fp32", kv="static")
    # check_torch off: this test compares with transformers itself
    return optimize_model(static, out, target="onnxruntime", precision="fp32", check_torch=False)


def test_optimized_static_graph_matches_transformers_over_slots(ort_fp32, tiny_model_dir):
    import onnx

    ops = {
        n.op_type for n in onnx.load(ort_fp32 / "model.onnx", load_external_data=False).graph.node
    }
    assert "GroupQueryAttention" in ops
    model = T.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    gen = load(ort_fp32, slots=2, tokenizer=False)  # 4 prompts: two refills
    done = gen.generate(PROMPTS, max_new_tokens=20, min_new_tokens=20)
    for p, c in zip(PROMPTS, done, strict=True):
        ref = model.generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20)
        assert c.token_ids == ref[0, len(p) :].tolist()


def test_optimized_static_graph_updates_in_place(ort_fp32):
    backend = load(ort_fp32, slots=3, tokenizer=False).backend
    ptrs = backend.buffer_ptrs()
    backend.step([SlotFeed(0, PROMPTS[0], restart=True), SlotFeed(2, PROMPTS[1], restart=True)])
    assert backend.present_ptrs() == ptrs
    backend.step([SlotFeed(1, [1, 2, 3], restart=True)])
    before = backend.read_slot(1, 0)[:, :3]
    backend.step([SlotFeed(0, [4]), SlotFeed(2, [5])])  # one call over 0..2, slot 1 idle
    backend.step([SlotFeed(0, [6, 7, 8]), SlotFeed(2, [9, 10])])
    assert backend.present_ptrs() == ptrs
    assert (backend.read_slot(1, 0)[:, :3] == before).all()
    assert [backend.length(s) for s in range(3)] == [11, 3, 5]
