"""What a grammar's token mask costs per token: the same decode with and without response_format.

A live server over the bundled model's static export (1 slot, 1 ORT thread). Each round sends,
interleaved, a chat request constrained by a JSON schema and the same request unconstrained with
`ignore_eos` and `max_tokens` equal to the constrained answer's token count, so both decode the
same number of tokens after the same prefill; the ratio of their per-token times is the mask's
cost. Besides, the mask alone (llguidance's bitmask, the unpack, the -inf fill) and the advance
over each token are timed in-process over the constrained answers' tokens.

`--tokenizer DIR` adds the in-process mask cost at that tokenizer's vocabulary (the bundled
model's is 384 tokens): random walks through the grammar, each token drawn among the allowed.

Run: .venv/bin/python bench/structured_cost.py ARTIFACT [--rounds 10] [--tokenizer DIR]
(prints one JSON object)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from openai import OpenAI

from kiln.models.zen import ZEN_DIR
from kiln.runtime.server import LiveServer, ServerState
from kiln.runtime.server.serve import slots_loader
from kiln.runtime.structured import Grammars, grammar_for_json_schema
from kiln.runtime.tokenizer import Tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]


def main() -> None:
    """Interleaved rounds; one JSON line of medians."""
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokenizer", type=Path, default=None)
    args = ap.parse_args()
    state = ServerState(
        slots_loader(args.artifact, slots=1, backend="auto", device="cpu", threads=1)
    )
    srv = LiveServer(state).start()
    client = OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    per_token: dict[str, list[float]] = {"mask": [], "plain": []}
    answers = []
    try:
        for seed in range(args.rounds):
            kw = {"model": state.model.name, "messages": CHAT, "temperature": 1.0, "seed": seed}
            t0 = time.perf_counter()
            r = client.chat.completions.create(**kw, max_tokens=200, response_format=fmt)
            dt = time.perf_counter() - t0
            n = r.usage.completion_tokens
            per_token["mask"].append(dt / n)
            answers.append(r.choices[0].model_extra["token_ids"])
            t0 = time.perf_counter()
            p = client.chat.completions.create(**kw, max_tokens=n, extra_body={"ignore_eos": True})
            per_token["plain"].append((time.perf_counter() - t0) / p.usage.completion_tokens)
    finally:
        srv.stop()
    tok = Tokenizer.from_folder(ZEN_DIR)
    assert tok is not None and state.model is not None
    grammars = Grammars(tok, state.model.vocab, state.model.eos_ids)
    grammar = grammar_for_json_schema(SCHEMA)
    logits = np.random.default_rng(0).normal(size=state.model.vocab).astype(np.float32)
    mask_s, accept_s = [], []
    for ids in answers:
        c = grammars.constraint(grammar)
        for t in ids:
            t0 = time.perf_counter()
            c.mask(logits)
            t1 = time.perf_counter()
            c.accept(t)
            mask_s.append(t1 - t0)
            accept_s.append(time.perf_counter() - t1)
    med = {k: statistics.median(v) * 1e3 for k, v in per_token.items()}
    big = _walk_cost(args.tokenizer, grammar, args.rounds) if args.tokenizer else None
    print(
        json.dumps(
            {
                "ms_per_token_with_mask": round(med["mask"], 3),
                "ms_per_token_plain": round(med["plain"], 3),
                "ratio": round(med["mask"] / med["plain"], 3),
                "mask_us": round(statistics.median(mask_s) * 1e6, 1),
                "accept_us": round(statistics.median(accept_s) * 1e6, 1),
                "vocab": state.model.vocab,
                "rounds": args.rounds,
                "tokens": sum(map(len, answers)),
                "big_vocab": big,
                "loadavg": os.getloadavg(),
            }
        )
    )


def _walk_cost(folder: Path, grammar: str, walks: int) -> dict[str, float]:
    """Median mask and advance times (us) at another tokenizer's vocabulary."""
    tok = Tokenizer.from_folder(folder)
    assert tok is not None
    vocab = tok.backend.get_vocab_size()
    eos = tok.backend.token_to_id(tok.special_tokens.get("eos_token", "")) or 0
    grammars = Grammars(tok, vocab, (eos,))
    rng = np.random.default_rng(0)
    logits = rng.normal(size=vocab).astype(np.float32)
    mask_s, accept_s = [], []
    for _ in range(walks):
        c = grammars.constraint(grammar)
        for _ in range(60):
            t0 = time.perf_counter()
            masked = c.mask(logits)
            t1 = time.perf_counter()
            token = int(rng.choice(np.flatnonzero(np.isfinite(masked))))
            t2 = time.perf_counter()
            done = c.accept(token)
            accept_s.append(time.perf_counter() - t2)
            mask_s.append(t1 - t0)
            if done or token == eos:
                break
    return {
        "vocab": vocab,
        "mask_us": round(statistics.median(mask_s) * 1e6, 1),
        "accept_us": round(statistics.median(accept_s) * 1e6, 1),
        "tokens": len(mask_s),
    }


if __name__ == "__main__":
    sys.exit(main())
