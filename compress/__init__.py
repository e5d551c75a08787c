"""Compression that changes the model's shape: structured pruning of a Hugging Face folder.

`prune_model` reads a Llama-family folder, measures what to cut on calibration text
(compress/prune.py, compress/vocab.py), gates the result by a quality budget (mean KL of the
next-token distribution against the original on calibration windows) and writes a smaller
Hugging Face folder (safetensors, config, tokenizer) that transformers loads and `kiln export`
takes as any model, with prune.json beside it. Weight-only quantization and 2:4 sparsity of a
graph are optimize passes (optimize/calibrated.py, mixed.py, sparsity.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from kiln.compress.prune import PruneSpec, params, prune
from kiln.errors import KilnError, QualityBudgetError

__all__ = ["PRUNE_FILE", "PruneSpec", "calibration_windows", "prune_model"]

log = logging.getLogger(__name__)

PRUNE_FILE = "prune.json"
_CARRIED = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def calibration_windows(
    text: str, tokenizer_dir: Path, *, sequences: int, length: int
) -> list[list[int]]:
    """`sequences` windows of `length` tokens spread evenly over `text`."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(text)["input_ids"]
    if len(ids) < length:
        raise KilnError(f"calibration text has {len(ids)} tokens, fewer than {length}.")
    starts = np.linspace(0, len(ids) - length, num=min(sequences, len(ids) // length)).astype(int)
    return [list(ids[s : s + length]) for s in starts]


def _log_probs(model: Any, seqs: list[list[int]]) -> list[np.ndarray]:
    import torch

    out = []
    with torch.no_grad():
        for s in seqs:
            logits = model(torch.tensor([s]), use_cache=False).logits[0].double()
            out.append(torch.log_softmax(logits, -1).numpy())
    return out


def gate_kl(ref: list[np.ndarray], got: list[np.ndarray], keep: list[int] | None) -> float:
    """Mean KL(ref || got) in nats; with a pruned vocabulary, ref renormalized over `keep`."""
    total, n = 0.0, 0
    for r, g in zip(ref, got, strict=True):
        if keep is not None:
            r = r[:, keep]
            r = r - np.log(np.exp(r).sum(-1, keepdims=True))
        total += float((np.exp(r) * (r - g)).sum())
        n += r.shape[0]
    return total / max(n, 1)


def prune_model(
    src: Path,
    out: Path,
    *,
    calibration: Path,
    spec: PruneSpec,
    vocab_corpus: list[Path] | None = None,
    max_kl: float | None = None,
    sequences: int = 16,
    length: int = 256,
) -> dict[str, Any]:
    """Prune the Hugging Face folder `src` into `out`; return the prune.json record.

    `vocab_corpus`: text files whose tokens are kept (None keeps the vocabulary). `max_kl`:
    the quality budget; over it, nothing is written and QualityBudgetError names the figures.
    """
    from transformers import AutoModelForCausalLM

    from kiln.compress.vocab import kept_tokens, prune_vocab, rewrite_tokenizer, used_ids

    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    text = calibration.read_text(errors="replace")
    seqs = calibration_windows(text, src, sequences=sequences, length=length)
    gate, calib = seqs[1::2], seqs[0::2]  # cut decisions and the gate see different windows
    model = AutoModelForCausalLM.from_pretrained(src, dtype="float32").eval()
    before = params(model)
    ref = _log_probs(model, gate)
    record: dict[str, Any] = {"source": str(src), "spec": spec.__dict__, "params_before": before}
    record["cuts"] = prune(model, calib, spec)
    keep = None
    if vocab_corpus:
        corpus = [text, *(p.read_text(errors="replace") for p in vocab_corpus)]
        keep = kept_tokens(src / "tokenizer.json", used_ids(src, corpus))
        record["vocab"] = {"kept": len(keep), "of": model.config.vocab_size}
        prune_vocab(model, keep)
    got = _log_probs(model, [[_new(t, keep) for t in s] for s in gate])
    kl = gate_kl(ref, got, keep)
    record.update(
        params_after=params(model),
        gate={"kl": kl, "max_kl": max_kl, "windows": len(gate), "tokens": length},
        calibration={"file": str(calibration), "windows": len(calib)},
    )
    if max_kl is not None and kl > max_kl:
        raise QualityBudgetError(
            f"pruning {spec} costs mean KL {kl:.4g} nats on the calibration gate windows, over "
            f"the budget {max_kl:g}; prune less or raise --max-kl. Nothing was written."
        )
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    for name in _CARRIED:
        if (src / name).is_file() and not (tmp / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if keep is None:
        shutil.copy2(src / "tokenizer.json", tmp / "tokenizer.json")
    else:
        rewrite_tokenizer(src, tmp, keep)
    record["elapsed_s"] = round(time.perf_counter() - t0, 2)
    (tmp / PRUNE_FILE).write_text(json.dumps(record, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("pruned %s -> %s: %d -> %d params, gate KL %.4g", src, out, before,
             record["params_after"], kl)  # fmt: skip
    return record


def _new(token: int, keep: list[int] | None) -> int:
    if keep is None:
        return token
    i = int(np.searchsorted(keep, token))
    if i == len(keep) or keep[i] != token:
        raise KilnError(f"token {token} of the gate text is not in the kept vocabulary")
    return i
