"""`kiln eval` on the bundled model: PyTorch and ONNX agree, a model against itself has KL 0,
a perturbed model is caught, and eval.json holds the protocol."""

from __future__ import annotations

import hashlib
import json
import math

import pytest

from kiln.cli import main
from kiln.errors import ConfigError
from kiln.evaluate import EvalOptions, evaluate_model
from kiln.models.zen import ZEN_DIR

# Small runs: 2 greedy prompts of 8 tokens, windows of 64 with stride 32 over the Zen (~340 tokens).
OPTS = EvalOptions(window=64, stride=32, greedy_tokens=8, prompts=2)
# fp32 ONNX Runtime vs PyTorch: logits agree to ~1e-5 (export check), so perplexity agrees to
# well under 1e-4 relative and the KL is float64 rounding of near-identical distributions.
PPL_RTOL = 1e-4
KL_ZERO = 1e-9


def test_torch_folder_and_fp32_onnx_agree(exported, zen_txt, tmp_path):
    r = evaluate_model(
        exported("zen"), reference=ZEN_DIR, text=zen_txt, out=tmp_path, options=OPTS
    ).results
    assert r["perplexity"] == pytest.approx(r["reference_perplexity"], rel=PPL_RTOL)
    assert r["kl_mean"] < KL_ZERO
    assert r["top1_agreement"] == 1.0
    assert r["greedy_agreement"] == 1.0


def test_static_layout_scores_like_concat(exported, zen_txt, tmp_path):
    concat = evaluate_model(exported("zen"), text=zen_txt, out=tmp_path / "c", options=OPTS)
    static = evaluate_model(
        exported("zen", kv="static"),
        reference=exported("zen"),
        text=zen_txt,
        out=tmp_path / "s",
        options=OPTS,
    )
    assert static.results["perplexity"] == pytest.approx(concat.results["perplexity"], rel=PPL_RTOL)
    assert static.results["kl_mean"] < KL_ZERO
    assert static.results["greedy_agreement"] == 1.0


def test_a_model_against_itself_has_zero_kl(exported, zen_txt, tmp_path):
    onnx = exported("zen")
    r = evaluate_model(onnx, reference=onnx, text=zen_txt, out=tmp_path, options=OPTS).results
    assert r["kl_mean"] == pytest.approx(0.0, abs=1e-12)
    assert r["top1_agreement"] == 1.0
    assert r["greedy_agreement"] == 1.0
    assert r["perplexity"] == r["reference_perplexity"]


def test_a_perturbed_weight_shows_as_kl_and_lost_agreement(
    exported, perturbed_zen, zen_txt, tmp_path
):
    r = evaluate_model(
        perturbed_zen, reference=exported("zen"), text=zen_txt, out=tmp_path, options=OPTS
    ).results
    assert r["kl_mean"] > 1e-2
    assert r["top1_agreement"] < 1.0
    assert r["perplexity"] > r["reference_perplexity"]


def test_one_window_over_the_whole_text_is_the_models_own_loss(zen_txt, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ZEN_DIR)(zen_txt.read_text(), return_tensors="pt")
    ids = ids["input_ids"][:, :100]
    model = AutoModelForCausalLM.from_pretrained(ZEN_DIR, dtype=torch.float32).eval()
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    r = evaluate_model(
        ZEN_DIR, text=zen_txt, out=tmp_path, options=EvalOptions(window=100, stride=100, tokens=100)
    ).results
    assert r["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_eval_json_records_the_protocol(exported, zen_txt, tmp_path, capsys):
    onnx = exported("zen")
    argv = ["eval", str(onnx), "--reference", str(ZEN_DIR), "--text", str(zen_txt)]
    argv += ["--window", "64", "--stride", "32", "--tokens", "200", "--greedy-tokens", "8"]
    argv += ["--prompts", "3", "--out", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "window 64, stride 32" in printed and "KL(ref || cand)" in printed
    data = json.loads((tmp_path / "eval.json").read_text())
    assert (data["kind"], data["format"]) == ("kiln.eval", 1)
    p = data["protocol"]
    assert p["text"]["sha256"] == hashlib.sha256(zen_txt.read_bytes()).hexdigest()
    assert p["text"]["tokens_used"] == 200
    assert p["perplexity"]["window"] == 64 and p["perplexity"]["stride"] == 32
    assert p["perplexity"]["tokens_scored"] == 199  # every token but the first
    assert p["perplexity"]["windows"] == 6  # starts 0, 32, ..., 160; [160, 200) reaches the end
    assert p["greedy"]["prompts"] == 3 and p["greedy"]["new_tokens"] == 8
    assert p["greedy"]["prompt_offsets"] == [0, 56, 112]  # i * (200 - 32) // 3
    assert data["candidate"]["kind"] == "onnx" and data["candidate"]["ort_optimization"] == "all"
    assert data["reference"]["kind"] == "huggingface"
    assert len(data["results"]["greedy_agreement_per_prompt"]) == 3
    assert not list(tmp_path.glob(".eval.json.*"))  # written atomically: no temp file left


def test_missing_text_names_the_flag(exported, tmp_path):
    with pytest.raises(ConfigError, match="--text"):
        evaluate_model(exported("zen"), out=tmp_path, options=OPTS)


def test_greedy_longer_than_static_slots_is_refused(exported, zen_txt, tmp_path):
    static = exported("zen", kv="static")  # 384 slots
    with pytest.raises(ConfigError, match="max-context"):
        evaluate_model(
            static,
            reference=static,
            text=zen_txt,
            out=tmp_path,
            options=EvalOptions(window=64, stride=32, greedy_tokens=400),
        )
