"""The onnxruntime target: contrib-op fusions per family and KV layout, parity, bad input."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from kiln.errors import ConfigError
from kiln.parity import TOL

_MADE: dict[tuple[str, str, str], Path] = {}


@pytest.fixture(scope="session")
def ort_optimized(
    exported: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Path]:
    """Factory: the onnxruntime-target artifact of (model, precision, kv), made once."""
    from kiln.optimize import optimize_model

    def get(name: str, precision: str = "fp32", kv: str = "concat") -> Path:
        key = (name, precision, kv)
        if key not in _MADE:
            out = tmp_path_factory.mktemp(f"ort-{name}-{precision}-{kv}") / "optimized"
            _MADE[key] = optimize_model(
                exported(name, "fp32", kv),
                out,
                target="onnxruntime",
                precision=precision,
                check_torch=name != "zen",  # the bundled model is judged by its text
            )
        return _MADE[key]

    return get


def ops(artifact: Path) -> Counter[str]:
    """Node counts by op type of an artifact's model.onnx."""
    proto = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    return Counter(n.op_type for n in proto.graph.node)


# Tiny models have 2 layers: one GQA per layer; RoPE on q and k (concat) or inside GQA
# (static: do_rotary over the packed QKV); two norms per layer of which all but the first
# become Skip* (the first has no residual Add before it), plus the final one; Q/K/V and
# gate/up packed into one MatMul + Split each (GPT-2's c_attn is packed already).
_LLAMA = {"SkipSimplifiedLayerNormalization": 4, "SimplifiedLayerNormalization": 1}
EXPECTED = {
    ("llama", "concat"): {**_LLAMA, "GroupQueryAttention": 2, "RotaryEmbedding": 4, "Split": 4},
    ("qwen3", "concat"): {  # + per-head q/k RMSNorm (GQA's q_norm_weight is CUDA-only)
        "GroupQueryAttention": 2,
        "RotaryEmbedding": 4,
        "SkipSimplifiedLayerNormalization": 4,
        "SimplifiedLayerNormalization": 5,
        "Split": 4,
    },
    ("gpt2", "concat"): {"GroupQueryAttention": 2, "SkipLayerNormalization": 5, "Gelu": 2},
    ("llama", "static"): {**_LLAMA, "GroupQueryAttention": 2, "RotaryEmbedding": 0, "Split": 2},
    ("zen", "static"): {  # 4 layers
        "GroupQueryAttention": 4,
        "RotaryEmbedding": 0,
        "SkipSimplifiedLayerNormalization": 8,
        "SimplifiedLayerNormalization": 1,
        "Split": 4,
    },
}
UNFUSED = ("Softmax", "Attention", "TensorScatter", "Cos", "Sin", "Neg", "Pow", "ReduceMean")


@pytest.mark.parametrize(("name", "kv"), list(EXPECTED))
def test_fused_ops_per_family_and_layout(ort_optimized, name, kv):
    artifact = ort_optimized(name, "fp32", kv)
    got = ops(artifact)
    for op, n in EXPECTED[name, kv].items():
        assert got[op] == n, f"{op}: {got[op]} != {n} in {dict(got)}"
    assert not [op for op in UNFUSED if got[op]], dict(got)
    manifest = json.loads((artifact / "optimize.json").read_text())
    assert manifest["target"] == "onnxruntime"
    assert (
        manifest["contrib_ops"]["GroupQueryAttention"] == EXPECTED[name, kv]["GroupQueryAttention"]
    )
    assert manifest["parity"]["ok"] and manifest["parity"]["greedy_64"] == 1.0
    if name != "zen":  # PyTorch parity: ragged left-padded batch (concat) or slots (static)
        torch = manifest["parity"]["torch"]
        assert torch["ok"] and torch["logits_max_abs"] <= TOL["fp32"].atol, torch


def _torch_model(name: str, tiny_model_dir):
    from kiln.export.source import describe_source, load_model

    src = tiny_model_dir(name)
    model = load_model(src)
    return model, describe_source(src).family.shape(model.config)


def test_static_slots_match_pytorch(ort_optimized, tiny_model_dir):
    """The static parity check on the fused graph: ragged slots, 20 decode steps, a refill."""
    from kiln.export.check import check_parity

    model, shape = _torch_model("llama", tiny_model_dir)
    path = ort_optimized("llama", "fp32", "static") / "model.onnx"
    report, steps = check_parity(path, model, shape)
    assert report.ok, report.worst().describe()
    assert len(steps) == 21 and max(s["logits_max_abs"] for s in steps) <= TOL["fp32"].atol


def _without_padding_bias(src: Path, dst: Path) -> Path:
    """A copy whose GroupQueryAttention nodes ignore the padding mask (attention_bias dropped)."""
    proto = onnx.load(str(src / "model.onnx"))
    for node in proto.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[10] = ""
    onnx.save(proto, str(dst))
    return dst


def test_negative_control_ragged_batch_needs_the_padding_bias(
    ort_optimized, tiny_model_dir, tmp_path
):
    """A GQA rewrite that forgot left padding passes batch 1 but fails the ragged batch."""
    from kiln.export.check import CheckPoint, Trajectories, check_parity

    model, shape = _torch_model("llama", tiny_model_dir)
    bad = _without_padding_bias(ort_optimized("llama"), tmp_path / "bad.onnx")
    batch_1 = Trajectories((CheckPoint(batch=1, chunks=(7, 1, 1)),))
    one, _ = check_parity(bad, model, shape, plan=batch_1)
    assert one.ok
    ragged, _ = check_parity(bad, model, shape)
    assert not ragged.ok


def test_negative_control_perturbed_weight_fails_parity(ort_optimized, tiny_model_dir, tmp_path):
    from kiln.export.check import check_parity

    model, shape = _torch_model("llama", tiny_model_dir)
    proto = onnx.load(str(ort_optimized("llama") / "model.onnx"))
    w = next(t for t in proto.graph.initializer if t.name.endswith("input_layernorm.weight"))
    arr = onnx.numpy_helper.to_array(w).copy()
    arr[0] += 0.01
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    report, _ = check_parity(tmp_path / "bad.onnx", model, shape)
    assert not report.ok


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_matmul_nbits_within_tolerance(ort_optimized, precision):
    artifact = ort_optimized("llama", precision)
    got = ops(artifact)
    assert got["MatMulNBits"] == 9 and got["MatMul"] == 0  # qkv, o, gate/up, down + LM head
    manifest = json.loads((artifact / "optimize.json").read_text())
    nbits = next(p for p in manifest["passes"] if p["name"].startswith("matmul-nbits"))
    assert nbits["counts"]["bytes_after"] < nbits["counts"]["bytes_before"]
    torch = manifest["parity"]["torch"]
    assert manifest["parity"]["ok"] and torch["ok"], manifest["parity"]
    assert torch["logits_max_abs"] <= TOL[precision].atol
    assert torch["logits_max_abs"] > TOL["fp32"].atol  # the weights really are quantized
    proto = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    bits = {
        a.i
        for n in proto.graph.node
        if n.op_type == "MatMulNBits"
        for a in n.attribute
        if a.name == "bits"
    }
    assert bits == {int(precision[3:])}


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_zen_text_through_the_onnxruntime_target(ort_optimized, precision):
    from kiln.models.zen import ZEN_PROMPT, zen_text
    from kiln.runtime import load

    gen = load(ort_optimized("zen", precision, "concat"))
    done = gen.generate(ZEN_PROMPT, max_new_tokens=400)
    assert done.finish_reason == "stop"
    assert ZEN_PROMPT + done.text == zen_text()


def test_zen_text_through_the_static_onnxruntime_target(ort_optimized):
    from transformers import AutoTokenizer

    from kiln.graph_io import stepper
    from kiln.models.zen import ZEN_PROMPT, zen_text
    from kiln.optimize.parity import decode_argmax

    artifact = ort_optimized("zen", "fp32", "static")
    tok = AutoTokenizer.from_pretrained(artifact)
    prompt = tok(ZEN_PROMPT)["input_ids"]
    prompt = prompt if prompt[:1] == [tok.bos_token_id] else [tok.bos_token_id, *prompt]
    ids = decode_argmax(stepper(artifact / "model.onnx"), prompt, 340, None)
    ids = ids[: ids.index(tok.eos_token_id)] if tok.eos_token_id in ids else ids
    assert ZEN_PROMPT + tok.decode(ids, skip_special_tokens=True) == zen_text()


def test_bad_target_and_precision_are_refused(exported, tmp_path, capsys):
    from kiln.cli import main
    from kiln.optimize import optimize_model

    src = exported("llama")
    with pytest.raises(ConfigError, match="target 'tpu' is not supported"):
        optimize_model(src, tmp_path / "a", target="tpu", precision="fp32")
    with pytest.raises(ConfigError, match="not offered for target 'onnxruntime'"):
        optimize_model(src, tmp_path / "b", target="onnxruntime", precision="fp16")
    assert main(["optimize", str(src), "--target", "onnxruntime", "--precision", "bf16"]) == 1
    assert "choose one of fp32, int8, int4" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_onnxruntime_target_refuses_an_fp16_export(exported, tmp_path):
    from kiln.optimize import optimize_model

    with pytest.raises(ConfigError, match="needs an fp32 export"):
        optimize_model(
            exported("llama", "fp16"), tmp_path / "c", target="onnxruntime", precision="fp32"
        )


def test_static_graph_shares_one_buffer_for_past_and_present(ort_optimized):
    """IO binding one OrtValue as past and present: decoding matches the unshared run."""
    import onnxruntime as ort

    from kiln.graph_io import ort_session

    path = ort_optimized("llama", "fp32", "static") / "model.onnx"
    sess = ort_session(path)
    pasts = [i for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    # The unshared run: plain session.run, the presents fed back as the next past.
    kv = [np.zeros((1, *p.shape[1:]), np.float32) for p in pasts]
    ids, done, want = [5, 6, 7, 8], 0, []
    for _ in range(12):
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "position_ids": np.arange(done, done + len(ids))[None],
            "write_index": np.array([done], np.int64),
        }
        logits, *kv = sess.run(
            None, {**feeds, **{p.name: v for p, v in zip(pasts, kv, strict=True)}}
        )
        want.append(int(np.argmax(logits[0, -1])))
        done, ids = done + len(ids), [want[-1]]
    bufs = [
        ort.OrtValue.ortvalue_from_numpy(np.zeros((1, *p.shape[1:]), np.float32)) for p in pasts
    ]
    ids, done, got = [5, 6, 7, 8], 0, []
    for _ in range(12):
        b = sess.io_binding()
        b.bind_output("logits", "cpu")  # first: get_outputs() follows binding order
        feeds = {  # held until the run: bind_cpu_input does not copy
            "input_ids": np.array([ids], np.int64),
            "position_ids": np.arange(done, done + len(ids))[None],
            "write_index": np.array([done], np.int64),
        }
        for name, value in feeds.items():
            b.bind_cpu_input(name, value)
        for p, v in zip(pasts, bufs, strict=True):
            b.bind_ortvalue_input(p.name, v)
            b.bind_ortvalue_output(p.name.replace("past_key_values", "present"), v)
        sess.run_with_iobinding(b)
        got.append(int(np.argmax(b.get_outputs()[0].numpy()[0, -1])))
        done, ids = done + len(ids), [got[-1]]
    assert got == want


def test_sliding_window_keeps_its_attention_and_says_why(ort_optimized):
    """GQA's local_window_size is not mapped: a windowed graph keeps its exact attention."""
    artifact = ort_optimized("mistral-window")
    got = ops(artifact)
    assert got["GroupQueryAttention"] == 0 and got["Softmax"] == 2
    assert got["RotaryEmbedding"] == 4 and got["SkipSimplifiedLayerNormalization"] == 4
    manifest = json.loads((artifact / "optimize.json").read_text())
    gqa = next(p for p in manifest["passes"] if p["name"] == "ort-gqa")
    assert "sliding window" in gqa["notes"][0]
    assert manifest["parity"]["ok"] and manifest["parity"]["torch"]["ok"]


def test_list_passes_for_the_onnxruntime_target(capsys):
    from kiln.cli import main

    argv = ["optimize", "x", "--list-passes", "--target", "onnxruntime", "--precision", "int4"]
    assert main(argv) == 0
    names = capsys.readouterr().out.split()
    assert names.index("ort-gqa") < names.index("ort-pack") < names.index("matmul-nbits-int4")
    assert "attention" not in names and "int4-weight-only" not in names
