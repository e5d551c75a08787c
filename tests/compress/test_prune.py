"""kiln prune on the eval model: the pruned folder loads in transformers and exports, vocabulary
pruning keeps greedy output, and the quality gates (prune and kiln compress) refuse."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kiln.compress import PRUNE_FILE, PruneSpec, prune_model
from kiln.errors import QualityBudgetError

EVAL = Path(__file__).resolve().parents[2] / "models" / "eval-llama"


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """Training-split files of the eval corpus (never the held-out ones)."""
    from kiln.models.train_eval import corpus_files, held_out, read_text, stdlib_root

    root = stdlib_root()
    train = [f for f in corpus_files(root) if not held_out(f)]
    pick = random.Random(0).sample(train, 6)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(read_text(root, f) for f in pick))
    return path


@pytest.fixture(scope="module")
def pruned(calib, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "hf"
    prune_model(EVAL, out, calibration=calib, spec=PruneSpec(layers=0.25, kv_groups=0.5, mlp=0.2),
                sequences=4, length=128)  # fmt: skip
    return out


def test_pruned_folder_loads_with_the_cut_shapes(pruned):
    record = json.loads((pruned / PRUNE_FILE).read_text())
    src = json.loads((EVAL / "config.json").read_text())
    cfg = json.loads((pruned / "config.json").read_text())
    layers, kv, f = (
        src[k] for k in ("num_hidden_layers", "num_key_value_heads", "intermediate_size")
    )
    kept_kv = kv - round(0.5 * kv)
    assert cfg["num_hidden_layers"] == layers - round(0.25 * layers)
    assert len(record["cuts"]["layers"]["removed"]) == round(0.25 * layers)
    assert cfg["num_key_value_heads"] == kept_kv
    assert cfg["num_attention_heads"] == kept_kv * src["num_attention_heads"] // kv
    assert cfg["intermediate_size"] == f - round(0.2 * f)
    model = AutoModelForCausalLM.from_pretrained(pruned)
    assert sum(p.numel() for p in model.parameters()) == record["params_after"]
    assert record["params_after"] < 0.95 * record["params_before"]
    ids = AutoTokenizer.from_pretrained(pruned)("def f(x):\n    return x", return_tensors="pt")
    assert model(**ids).logits.shape[-1] == src["vocab_size"]


def test_pruned_folder_exports_and_compress_gate(pruned, calib, tmp_path):
    from kiln.export import export_model
    from kiln.optimize.methods import COMPRESS_FILE, compress_artifact

    onnx = export_model(pruned, tmp_path / "onnx", precision="fp32")
    assert (onnx / "model.onnx").is_file()
    out = tmp_path / "sparse"
    with pytest.raises(QualityBudgetError, match="over the budget"):
        compress_artifact(onnx, out, method="sparse24", calibration=calib, target="onnxruntime",
                          max_kl=1e-9, sequences=2, length=128)  # fmt: skip
    assert not out.exists()
    record = compress_artifact(
        onnx, out, method="sparse24", calibration=calib, target="onnxruntime", max_kl=10.0,
        sequences=2, length=128,
    )  # fmt: skip
    assert 0 < record["gate"]["kl"] < 10.0
    assert (out / COMPRESS_FILE).is_file() and (out / "optimize.json").is_file()


def test_prune_gate_refuses_and_writes_nothing(calib, tmp_path):
    out = tmp_path / "x"
    with pytest.raises(QualityBudgetError, match="over the budget"):
        prune_model(EVAL, out, calibration=calib, spec=PruneSpec(mlp=0.5), max_kl=1e-9,
                    sequences=2, length=128)  # fmt: skip
    assert not out.exists() and not list(tmp_path.glob(".x.tmp-*"))


def _greedy(folder: Path, prompt: str, n: int) -> list[int]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0]]


def test_vocab_pruning_keeps_greedy_output(calib, tmp_path):
    text = calib.read_text()
    prompts = [text[i : i + 200] for i in (0, 5000, 20000)]
    base = [_greedy(EVAL, p, 24) for p in prompts]
    base_tok = AutoTokenizer.from_pretrained(EVAL)
    # The corpus: the calibration text and the model's own continuations of it.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(base_tok.decode(b) for b in base))
    out = tmp_path / "vocab"
    record = prune_model(EVAL, out, calibration=calib, spec=PruneSpec(), vocab_corpus=[corpus],
                         sequences=2, length=128)  # fmt: skip
    kept = record["vocab"]["kept"]
    assert kept < json.loads((EVAL / "config.json").read_text())["vocab_size"]
    new_tok = AutoTokenizer.from_pretrained(out)
    for p, b in zip(prompts, base, strict=True):
        got = _greedy(out, p, 24)
        assert new_tok.decode(got) == base_tok.decode(b)  # same text, renumbered tokens
        assert len(got) == len(b)
    assert record["gate"]["kl"] < 1e-3


def test_vocab_pruning_negative_control(calib):
    """Drop a token the model would generate (and the prompt lacks): greedy output changes."""
    from kiln.compress.vocab import prune_vocab

    text = calib.read_text()
    for offset in range(
        0, 20000, 1000
    ):  # the first short prompt whose continuation has a new token
        prompt = text[offset : offset + 40]
        base = _greedy(EVAL, prompt, 16)
        n = len(AutoTokenizer.from_pretrained(EVAL)(prompt).input_ids)
        novel = [t for t in base[n:] if t not in base[:n]]
        if novel:
            break
    first = novel[0]
    vocab = json.loads((EVAL / "config.json").read_text())["vocab_size"]
    keep = [t for t in range(vocab) if t != first]
    model = AutoModelForCausalLM.from_pretrained(EVAL).eval()
    prune_vocab(model, keep)
    ids = torch.tensor([[keep.index(t) for t in base[:n]]])
    with torch.no_grad():
        got = model.generate(ids, max_new_tokens=16, do_sample=False)[0].tolist()
    assert [keep[t] for t in got[n:]] != base[n:]
    # and with the token kept, the same remapping reproduces it (the positive case)
    model = AutoModelForCausalLM.from_pretrained(EVAL).eval()
    prune_vocab(model, list(range(vocab)))
    with torch.no_grad():
        same = model.generate(torch.tensor([base[:n]]), max_new_tokens=16, do_sample=False)[0]
    assert same.tolist() == base


def test_pruned_30_percent_folder_loads_and_exports_the_same_logits(calib, tmp_path):
    """30% of layers and MLP channels cut: transformers loads it, and the fp32 ONNX export of it
    gives the pruned model's log-probabilities (float32 tolerance), not the original's."""
    import onnx_ir as ir

    from kiln.export import export_model
    from kiln.optimize.calibrate import Calibration, log_probs

    hf = tmp_path / "hf"
    prune_model(EVAL, hf, calibration=calib, spec=PruneSpec(layers=0.3, mlp=0.3),
                sequences=4, length=128)  # fmt: skip
    src = json.loads((EVAL / "config.json").read_text())
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["num_hidden_layers"] == src["num_hidden_layers"] - round(
        0.3 * src["num_hidden_layers"]
    )
    assert cfg["intermediate_size"] == src["intermediate_size"] - round(
        0.3 * src["intermediate_size"]
    )
    ids = AutoTokenizer.from_pretrained(hf)(calib.read_text()[:600]).input_ids[:64]

    def torch_log_probs(folder: Path) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32").eval()
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)

    onnx = export_model(hf, tmp_path / "onnx", precision="fp32")
    got = torch.from_numpy(
        log_probs(ir.load(onnx / "model.onnx"), Calibration((tuple(ids),), "test"))[0]
    ).double()
    assert (got - torch_log_probs(hf)).abs().max() < 2e-3
    assert (got - torch_log_probs(EVAL)).abs().max() > 0.05  # the control: the unpruned model
