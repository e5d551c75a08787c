"""Vocabulary pruning: keep the tokens a corpus uses, remap embeddings, head and tokenizer.

Kept: every token the corpus tokenizes to, the special tokens, the byte-level alphabet (any
text still encodes), and every token a kept token is merged from (BPE builds a token through
its merge chain). A merge whose result is not kept never fired on the corpus, and dropping a
merge that was never chosen changes no choice, so the corpus tokenizes to the same tokens, each
renumbered. The embedding and LM-head rows of kept tokens move to their new ids, so logits over
kept tokens are the original ones: greedy output that stays within the kept set is unchanged.
Byte-level BPE tokenizer.json files only (what Llama-3, Qwen, SmolLM and GPT-2 ship).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ConfigError


def _bpe(tok: dict[str, Any], where: Path) -> dict[str, Any]:
    model: dict[str, Any] = tok.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConfigError(
            f"{where} is not a BPE tokenizer.json; vocabulary pruning supports byte-level BPE "
            "(drop --vocab to prune the rest)."
        )
    return model


def _pair(merge: Any) -> tuple[str, str]:
    a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
    return str(a), str(b)


def kept_tokens(tokenizer_json: Path, used_ids: set[int]) -> list[int]:
    """Old ids to keep, ascending: used, special, byte alphabet, and their merge parts."""
    tok = json.loads(tokenizer_json.read_text())
    model = _bpe(tok, tokenizer_json)
    vocab: dict[str, int] = model["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    parts = {a + b: (a, b) for a, b in map(_pair, model["merges"])}
    keep = set(used_ids) | {t["id"] for t in tok.get("added_tokens", [])}
    keep |= {i for t, i in vocab.items() if len(t) == 1}  # the byte-level alphabet
    todo = [by_id[i] for i in keep if i in by_id]
    while todo:
        t = todo.pop()
        for p in parts.get(t, ()):
            if p in vocab and vocab[p] not in keep:
                keep.add(vocab[p])
                todo.append(p)
    return sorted(keep)


def rewrite_tokenizer(src: Path, dst: Path, keep: list[int]) -> dict[int, int]:
    """Write dst/tokenizer.json over the kept ids, renumbered 0..n-1; the old->new map."""
    tok = json.loads((src / "tokenizer.json").read_text())
    model = _bpe(tok, src / "tokenizer.json")
    remap = {old: new for new, old in enumerate(keep)}
    model["vocab"] = {t: remap[i] for t, i in model["vocab"].items() if i in remap}
    names = set(model["vocab"])
    model["merges"] = [m for m in model["merges"] if {*_pair(m), "".join(_pair(m))} <= names]
    for t in tok.get("added_tokens", []):
        t["id"] = remap[t["id"]]
    _remap_ids(tok.get("post_processor"), remap)
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return remap


def _remap_ids(node: Any, remap: dict[int, int]) -> None:
    """Renumber `ids` lists inside a post-processor (TemplateProcessing special tokens)."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                node[k] = [remap[i] for i in v]
            else:
                _remap_ids(v, remap)
    elif isinstance(node, list):
        for v in node:
            _remap_ids(v, remap)


def prune_vocab(model: Any, keep: list[int]) -> None:
    """Keep embedding (and untied head) rows `keep`, in that order; config ids follow."""
    import torch

    idx = torch.as_tensor(keep, dtype=torch.long)
    remap = {old: new for new, old in enumerate(keep)}
    emb = model.get_input_embeddings()
    with torch.no_grad():
        new_emb = torch.nn.Embedding(len(keep), emb.weight.shape[1])
        new_emb.weight.copy_(emb.weight.index_select(0, idx))
        model.set_input_embeddings(new_emb)
        head = model.get_output_embeddings()
        if model.config.tie_word_embeddings:
            head.weight = new_emb.weight
        else:
            head.weight = torch.nn.Parameter(head.weight.index_select(0, idx).clone())
        head.out_features = len(keep)
    model.config.vocab_size = len(keep)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(cfg, key, None)
            if isinstance(v, int):
                setattr(cfg, key, remap.get(v))
            elif isinstance(v, list):
                setattr(cfg, key, [remap[i] for i in v if i in remap])


def used_ids(tokenizer_dir: Path, texts: list[str]) -> set[int]:
    """Every token id the tokenizer gives the texts."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: set[int] = set()
    for t in texts:
        ids |= set(np.unique(tok(t)["input_ids"]).tolist())
    return ids
