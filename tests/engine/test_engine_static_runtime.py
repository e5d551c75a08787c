"""The TensorRT slot backend's host side, on CPU: engine.json reading, feed validation, planning.

The device side (runtime/trt_slots.py TrtSlotBackend: cuda-python buffers bound as past and
present) cannot run without a GPU; the gpu-marked test at the end runs it (bench/gpu_check.py
run_static_checks). Here the same host logic (runtime/trt_slots.py EngineSlots over
runtime/slots.py SlotRunner: validation, call planning, ids / positions / write_index, logits
rows) drives the static ONNX through plain ONNX Runtime `run` with numpy buffers, and is
compared with PyTorch, so a wrong write position, padding or logits row shows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import transformers as T

from bench.gpu_check import greedy_slots
from kiln.engine import build_engine, load_profile, read_engine
from kiln.errors import ArtifactError, KilnError
from kiln.parity import TOL, compare
from kiln.runtime.artifact import inspect_artifact
from kiln.runtime.cuda_mem import gpu_compute_capability
from kiln.runtime.slots import SlotCall, SlotFeed, call_inputs, plan_calls
from kiln.runtime.trt_slots import EngineSlots, pick_profile, slot_spec, validate_feeds

pytest.importorskip("tensorrt_rtx", reason="the engine extra (tensorrt-rtx) is not installed")

M = 256  # STATIC_MAX_CONTEXT_TINY in tests/tiny_models.py


@pytest.fixture(scope="module")
def static_fp32(exported):
    return exported("llama", "fp32", kv="static")


@pytest.fixture(scope="module")
def engine_fp32(static_fp32, tmp_path_factory):
    gpu = dataclasses.replace(load_profile("rtx-ampere-ada-fp16"), name="fp32", precision="fp32")
    return build_engine(static_fp32, gpu, tmp_path_factory.mktemp("eng") / "fp32")


@pytest.fixture(scope="module")
def spec(engine_fp32):
    return slot_spec(read_engine(engine_fp32))


@pytest.fixture(scope="module")
def torch_model(tiny_model_dir):
    return T.AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()


class OrtExecutedRunner(EngineSlots):
    """EngineSlots whose calls run through onnxruntime with numpy [slots, Hkv, M, D] buffers.

    `shift` moves every write index (a negative control: the cache lands one position off).
    """

    name = "test-ort-executed"

    def __init__(self, onnx_path, spec, slots, shift=0):
        import onnxruntime as ort

        super().__init__(spec, slots)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # the copy warning: this executor copies by design
        self.session = ort.InferenceSession(
            str(onnx_path), opts, providers=["CPUExecutionProvider"]
        )
        shape = (slots, spec.kv_heads, spec.max_context, spec.head_dim)
        self.buffers = {p: np.zeros(shape, spec.kv_dtype) for p in spec.aliases.values()}
        self.shift = shift
        self.calls = []

    def _execute(self, call, ids, pos, index, pick):
        self.calls.append((call.lo, call.hi, ids.shape[1]))
        feeds = {"input_ids": ids, "position_ids": pos, "write_index": index + self.shift}
        feeds |= {p: b[call.lo : call.hi] for p, b in self.buffers.items()}
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(None, feeds), strict=True))
        for present, past in self.spec.aliases.items():
            self.buffers[past][call.lo : call.hi] = out[present]
        return out["logits"][pick[:, 0], pick[:, 1]].astype(np.float32)


def test_slot_spec_reads_the_static_engine_manifest(spec):
    assert (spec.max_context, spec.max_slots, spec.vocab) == (M, 4, 300)
    assert (spec.kv_heads, spec.head_dim, spec.kv_dtype, spec.logits_dtype) == (
        2, 16, "float32", "float32"
    )  # fmt: skip
    assert spec.profiles == ((0, "prefill", M), (1, "decode", 1))
    assert spec.aliases["present.1.value"] == "past_key_values.1.value" and len(spec.aliases) == 4
    assert spec.slot_bytes == 2 * M * 16 * 4


def test_slot_spec_refuses_concat_and_unaliased_engines(engine_fp32):
    m = read_engine(engine_fp32)
    with pytest.raises(ArtifactError, match=r"concat-KV engine; the slot backend needs one built"):
        slot_spec(dataclasses.replace(m, kv_cache={"layout": "concat"}))
    with pytest.raises(ArtifactError, match=r"does not record in-place KV updates"):
        slot_spec(dataclasses.replace(m, kv_cache={**m.kv_cache, "aliases": {}}))


def test_loading_without_a_gpu_or_with_the_wrong_layout_says_what_to_do(engine_fp32):
    from kiln.runtime.trt_backend import backend_from_engines, slot_backend_from_engines

    info = inspect_artifact(engine_fp32)
    assert info.layout.name == "static" and info.max_context == M
    with pytest.raises(KilnError, match=r"holds only static-KV engines, not concat ones"):
        backend_from_engines(info)
    if gpu_compute_capability() is None:
        with pytest.raises(KilnError, match=r"need an NVIDIA GPU"):
            slot_backend_from_engines(info, slots=2)


def test_profile_is_chosen_by_the_number_of_new_tokens(spec):
    assert pick_profile(spec, 1) == 1 and pick_profile(spec, 2) == 0 and pick_profile(spec, M) == 0
    with pytest.raises(KilnError, match=r"No optimization profile takes 257 new tokens"):
        pick_profile(spec, M + 1)


@pytest.mark.parametrize(
    ("feeds", "lengths", "message"),
    [
        ([SlotFeed(4, [1])], [0] * 4, r"Slot 4 is out of range: .*slots 0..3"),
        ([SlotFeed(1, [1]), SlotFeed(1, [2])], [0] * 4, r"Slot 1 is fed twice"),
        ([SlotFeed(2, [])], [0] * 4, r"Slot 2 is fed no tokens"),
        ([SlotFeed(0, [5, 300])], [0] * 4, r"Slot 0: token id 300 is outside the vocabulary"),
        ([SlotFeed(3, [1] * 2, restart=True)], [0, 0, 0, 255], None),  # restart: fits
        ([SlotFeed(3, [1] * 2)], [0, 0, 0, 255], r"Slot 3 holds 255 positions; 2 more would pass"),
    ],
)
def test_feed_validation_names_the_slot_and_the_fix(spec, feeds, lengths, message):
    if message is None:
        validate_feeds(feeds, lengths, spec, 4)
        return
    with pytest.raises(KilnError, match=message):
        validate_feeds(feeds, lengths, spec, 4)


def test_too_wide_a_feed_names_the_profile_fix(spec):
    narrow = dataclasses.replace(spec, profiles=((0, "prefill", 8), (1, "decode", 1)))
    with pytest.raises(KilnError, match=r"fed 9 tokens, .*chunks of at most 8.*max_sequence"):
        validate_feeds([SlotFeed(0, [1] * 9, restart=True)], [0] * 4, narrow, 4)


def test_a_bad_feed_touches_no_buffer(static_fp32, spec):
    runner = OrtExecutedRunner(static_fp32 / "model.onnx", spec, 3)
    runner.step([SlotFeed(0, [5, 6, 7], restart=True)])
    before = {p: b.copy() for p, b in runner.buffers.items()}
    with pytest.raises(KilnError, match="Slot 2 is fed no tokens"):
        runner.step([SlotFeed(0, [8]), SlotFeed(2, [])])
    assert runner.length(0) == 3 and len(runner.calls) == 1
    assert all(np.array_equal(before[p], runner.buffers[p]) for p in before)


def test_plan_runs_prefill_then_decode_over_the_slot_ranges_they_span():
    feeds = [SlotFeed(0, [1]), SlotFeed(1, [2, 3, 4], restart=True), SlotFeed(2, [5])]
    calls = plan_calls(feeds, [5, 9, 7, 0], M)
    assert [(c.lo, c.hi, c.width, [f.slot for f in c.feeds]) for c in calls] == [
        (1, 2, 3, [1]),
        (0, 3, 1, [0, 2]),  # slot 1 idles in the decode call (3 rows for 2 feeds: kept)
    ]
    # Sparse feeds (slots 0 and 4: 5 rows for 2 tokens) run one by one.
    sparse = plan_calls([SlotFeed(0, [1]), SlotFeed(4, [1])], [1] * 5, M)
    assert [(c.lo, c.hi) for c in sparse] == [(0, 1), (4, 5)]
    full = plan_calls([SlotFeed(0, [1]), SlotFeed(2, [1])], [3, M, 3, 0], M)
    assert [(c.lo, c.hi) for c in full] == [(0, 1), (2, 3)]  # slot 1's padding would pass M


def test_call_inputs_are_right_padded_with_repeated_positions():
    call = SlotCall(0, 3, (SlotFeed(0, [7, 8, 9], restart=True), SlotFeed(2, [4])), 3)
    ids, pos, index, pick = call_inputs(call, [5, 6, 10])
    assert ids.tolist() == [[7, 8, 9], [0, 0, 0], [4, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [6, 6, 6], [10, 10, 10]]  # idle slot 1 at its length
    assert index.tolist() == [0, 6, 10]
    assert pick.tolist() == [[0, 2], [2, 0]]


def _reference(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1].numpy()


SCHEDULE = (  # ragged prefill, decode, a slot idle, a refill while others decode
    {0: (7, True), 1: (4, True), 2: (9, True)},
    {0: (1, False), 1: (1, False), 2: (1, False)},
    {0: (1, False), 2: (1, False)},
    {0: (1, False), 1: (5, True), 2: (1, False)},
    {0: (1, False), 1: (1, False), 2: (1, False)},
    {2: (1, False)},
)


def _run_schedule(runner, model, seed=0):
    rng = np.random.default_rng(seed)
    seqs = {}
    diffs = []
    for step in SCHEDULE:
        feeds = []
        for slot, (n, restart) in step.items():
            toks = rng.integers(3, 300, size=n).tolist()
            seqs[slot] = toks if restart else seqs[slot] + toks
            feeds.append(SlotFeed(slot, toks, restart=restart))
        logits_NV = runner.step(feeds)
        for f, got in zip(feeds, logits_NV, strict=True):
            ref = _reference(model, seqs[f.slot])
            diffs.append(compare(f"slot {f.slot} at {len(seqs[f.slot])}", ref, got, TOL["fp32"]))
    return diffs


def test_runner_logits_match_pytorch_per_slot(static_fp32, spec, torch_model):
    runner = OrtExecutedRunner(static_fp32 / "model.onnx", spec, 4)
    diffs = _run_schedule(runner, torch_model)
    assert all(d.ok for d in diffs), [d.describe() for d in diffs if not d.ok]
    assert max(d.max_abs for d in diffs) < 1e-4
    assert (0, 3, 1) in runner.calls  # a decode call with an idle row inside its range
    assert runner.length(1) == 6 and runner.length(2) == 14


def test_writing_one_position_off_is_caught(static_fp32, spec, torch_model):
    """Negative control: the same schedule with every write index shifted by one fails."""
    runner = OrtExecutedRunner(static_fp32 / "model.onnx", spec, 4, shift=1)
    assert not all(d.ok for d in _run_schedule(runner, torch_model))


def test_greedy_schedule_with_refill_matches_pytorch_generate(static_fp32, spec, torch_model):
    """gpu_check's driver over the runner: three prompts, slot 1 refilled at step 4."""
    runner = OrtExecutedRunner(static_fp32 / "model.onnx", spec, 4)
    prompts = [[5, 9, 13, 200], [17, 3, 44], [8, 8, 60, 61, 62, 63]]
    refill = (4, 1, [99, 100, 101, 102, 103])
    got = greedy_slots(runner, prompts, 8, refill=refill)
    want = []
    for p in [*prompts, refill[2]]:  # greedy over the whole sequence, no cache: the reference
        seq = list(p)
        for _ in range(8):
            seq.append(int(np.argmax(_reference(torch_model, seq))))
        want.append(seq[len(p) :])
    want[1] = want[1][:4]  # slot 1's first sequence was dropped after 4 tokens
    assert got == want
    assert greedy_slots(runner, [refill[2]], 8)[0] == got[-1]  # refill == fresh run


@pytest.mark.gpu
@pytest.mark.skipif(
    gpu_compute_capability() is None,
    reason="no NVIDIA GPU/driver visible: TensorRT engines cannot be deserialized here",
)
def test_trt_slot_backend_on_the_gpu(tmp_path):
    from bench.gpu_check import _library_for, run_static_checks
    from kiln.runtime.generator import load

    cc = "{}.{}".format(*gpu_compute_capability())
    picked = _library_for(cc)
    assert picked is not None, f"no TensorRT library can build for SM{cc}"
    from kiln.export import export_model
    from kiln.models.zen import ZEN_DIR

    ort = load(export_model(ZEN_DIR, tmp_path / "onnx", precision="fp16"), backend="onnxruntime")
    results = run_static_checks(tmp_path, cc, picked[0], ort)
    assert all(ok for _, ok, _ in results), results
