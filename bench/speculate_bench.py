"""Speculative decoding and prefix reuse, measured: decode tok/s and chat TTFT, interleaved.

Decode: each runner (plain, n-gram speculation with k drafts, a draft artifact) generates the
same tokens (greedy, EOS ignored) for a grounded prompt (the text is in the prompt and the answer
starts it over) and a free one (the answer is not in the prompt); decode tok/s is
(new tokens - 1) / (last event - first event). Chat: a multi-turn exchange (each prompt is the
last prompt, its answer and a new message) through `Generator.stream`, with and without a
prefix cache; TTFT is the time from the call to the first event. Runners alternate round-robin
over --repeats, so they share the machine's noise; the load average is printed beside them.

usage: python -m bench.speculate_bench ARTIFACT [--draft ARTIFACT] [--repeats 5] [--new 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from kiln.models.zen import ZEN_PROMPT, zen_text
from kiln.runtime import Generator, load
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.speculate import Speculator, load_speculator


def decode_rate(gen: Generator, prompt: list[int], new: int) -> tuple[float, float]:
    """Decode tokens per wall second and per CPU second of one greedy run of `new` tokens.

    On a loaded host the wall clock also counts waiting for a core; this process's CPU time
    counts only its own work (with one intra-op thread, the work of the decode loop itself).
    """
    stamps = [
        (time.perf_counter(), time.process_time())
        for _ in gen.stream(prompt, max_new_tokens=new, ignore_eos=True)
    ]
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    return (len(stamps) - 1) / (w1 - w0), (len(stamps) - 1) / (c1 - c0)


def chat_ttft(gen: Generator, turns: int, seed: int, answer: int) -> list[float]:
    """TTFT of each turn of one chat (seconds)."""
    rng = np.random.default_rng(seed)
    history = gen.encode(ZEN_PROMPT)[:4] + [int(t) for t in rng.integers(100, 300, 40)]
    out = []
    for _ in range(turns):
        t0, first, ids = time.perf_counter(), 0.0, []
        for e in gen.stream(history, max_new_tokens=answer, ignore_eos=True):
            first = first or time.perf_counter() - t0
            ids.append(e.token_id)
        out.append(first)
        history = [*history, *ids, *(int(t) for t in rng.integers(100, 300, 12))]
    return out


def main() -> None:
    """Run the decode race and the chat, print the tables (and write --out JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--draft", default=None, help="a draft artifact (same tokenizer)")
    ap.add_argument("--ks", default="2,4,8", help="n-gram draft lengths to run")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    opts: dict[str, Any] = {"slots": 1, "spin": False, "threads": args.threads, "last_only": False}
    gen = load(args.artifact, **opts)
    text = zen_text()
    workloads = {
        "grounded": gen.encode(text[:700] + "\n" + text[:40]),
        "free": gen.encode(ZEN_PROMPT),
    }
    base: dict[str, Speculator | None] = {"plain": None}
    for k in (int(x) for x in args.ks.split(",")):
        base[f"ngram k={k}"] = load_speculator(gen, "ngram", draft_tokens=k)
    if args.draft:
        base["draft k=4"] = load_speculator(
            gen, args.draft, draft_tokens=4, spin=False, threads=args.threads
        )
    specs = {  # a Speculator per workload, so each keeps its own stats
        (wl, name): s and Speculator(s.drafter, draft_tokens=s.k)
        for wl in workloads
        for name, s in base.items()
    }
    load_avg = [os.getloadavg()[0]]
    rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for wl, prompt in workloads.items():
            for name in base:
                gen.speculator = specs[wl, name]
                rates.setdefault((wl, name), []).append(decode_rate(gen, prompt, args.new))
    gen.speculator = None
    warm = load(args.artifact, **opts)
    runs: dict[str, Callable[[int], list[float]]] = {
        "cold": lambda seed: chat_ttft(gen, args.turns, seed, 16),
        "prefix cache": lambda seed: chat_ttft(warm, args.turns, seed, 16),
    }
    ttft: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, run in runs.items():
            warm.prefix_cache = PrefixCache(warm.backend)  # each chat starts with an empty cache
            ttft.setdefault(name, []).extend(run(rep)[1:])  # turns after the first
    load_avg.append(os.getloadavg()[0])
    report: dict[str, Any] = {"artifact": args.artifact, "load_avg": load_avg, "decode": []}
    print(f"{args.artifact}: load average {load_avg[0]:.1f} -> {load_avg[1]:.1f}")
    print(
        "| workload | runner | tok/s wall, median (min-max) | x plain | tok per CPU-s | x plain "
        "| acceptance | tok/pass |"
    )
    for wl in workloads:
        plain_w = statistics.median(w for w, _ in rates[wl, "plain"])
        plain_c = statistics.median(c for _, c in rates[wl, "plain"])
        for name in base:
            r, spec = rates[wl, name], specs[wl, name]
            wall, cpu = [w for w, _ in r], [c for _, c in r]
            mw, mc = statistics.median(wall), statistics.median(cpu)
            acc, tpp = (spec.stats.acceptance_rate, spec.stats.tokens_per_pass) if spec else (0, 1)
            print(
                f"| {wl} | {name} | {mw:.0f} ({min(wall):.0f}-{max(wall):.0f}) | "
                f"{mw / plain_w:.2f} | {mc:.0f} | {mc / plain_c:.2f} | {acc:.0%} | {tpp:.2f} |"
            )
            report["decode"].append(
                {"workload": wl, "runner": name, "tok_s_wall": wall, "tok_per_cpu_s": cpu}
                | {"acceptance": acc, "tokens_per_pass": tpp}
            )
    for name, ts in ttft.items():
        p50 = statistics.median(ts) * 1e3
        print(f"| chat TTFT p50 | {name} | {p50:.1f} ms | n={len(ts)} |")
        report[f"ttft_p50_ms {name}"] = p50
    if warm.prefix_cache is not None:
        pc = warm.prefix_cache.stats
        print(f"prefix cache (last chat): hit rate {pc.hit_rate:.0%}, saved {pc.tokens_saved}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
