"""`make load ADAPTIVE=1`: `kiln serve` fixed against `kiln serve --adaptive` under the same burst.

Both servers serve the same artifact with the same slots and threads and stay up side by side
(the idle one sleeps); each round sends the burst to one, then the other, alternating which goes
first, so they share the host's noise. A burst: `--burst` clients arrive at once with long
seeded random token-id prompts (`--burst-prompt-tokens`, so the prefill budget binds), then a
tail of `--tail` short prompts arriving `--tail-gap` seconds apart. Every request decodes
greedily (temperature 0) to exactly `--max-tokens` tokens, so the two servers' outputs must be
equal token for token (runtime/server/adaptive.py never changes what a request computes); the
fixed server's own rounds are the control for run-to-run differences. Reports time to first
token p50/p99 (burst, tail, all), generated tokens/s, and adaptive's decisions by reason with
its last prefill budget and slot cap from /metrics; writes adaptive_ab.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadtest import (
    _get,
    _ms,
    _one,
    _start,
    add_model_args,
    kiln_command,
    openai_client,
    served_model,
    smollm_artifacts,
)
from kiln.artifacts import write_json_atomic
from kiln.runtime.server.serve import free_port

SERVERS = ("fixed", "adaptive")


def _prompts(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[list[int]]]:
    """(burst, tail) prompts of seeded random ids in [3, vocab): the same every round."""
    rng = np.random.default_rng(0)
    hi = min(vocab, 30000)
    burst = [rng.integers(3, hi, args.burst_prompt_tokens).tolist() for _ in range(args.burst)]
    tail = [rng.integers(3, hi, args.tail_prompt_tokens).tolist() for _ in range(args.tail)]
    return burst, tail


def _vocab(artifact: Path) -> int:
    """The served model's vocabulary size (the artifact's config.json), for valid prompt ids."""
    for name in ("config.json", "hf/config.json"):
        path = artifact / name
        if path.is_file():
            return int(json.loads(path.read_text())["vocab_size"])
    return 30000


def _adaptive_counts(url: str) -> dict[str, float]:
    """kiln_adaptive_decisions by reason, the prefill budget and the slot cap, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kiln_adaptive_decisions_total":
                out[f"decisions_{s.labels['reason']}"] = float(s.value)
            elif s.name in ("kiln_prefill_budget_tokens", "kiln_active_slot_cap"):
                out[s.name.removeprefix("kiln_")] = float(s.value)
    return out


async def _burst(url: str, model: str, args: argparse.Namespace, prompts: Any) -> dict[str, Any]:
    """One burst and its tail against one server: per-request stamps and texts."""
    burst, tail = prompts
    client = openai_client(url, timeout=600)

    async def greedy(prompt: list[int], delay: float) -> dict[str, Any]:
        await asyncio.sleep(delay)
        return await _one(client, model, prompt, 0, args.max_tokens, temperature=0.0)

    start = time.perf_counter()
    jobs = [greedy(p, 0.0) for p in burst]
    jobs += [greedy(p, args.tail_delay + i * args.tail_gap) for i, p in enumerate(tail)]
    results = await asyncio.gather(*jobs)
    elapsed = time.perf_counter() - start
    await client.close()  # and its connection pool
    return {"results": results, "elapsed_s": elapsed}


def _figures(run: dict[str, Any], n_burst: int) -> dict[str, Any]:
    res = run["results"]
    ttft = [r["stamps"][0] - r["t0"] for r in res if r["stamps"]]
    tokens = sum(r["tokens"] for r in res)
    return {
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "burst_ttft_p50_ms": _ms(ttft[:n_burst], 50),
        "burst_ttft_p99_ms": _ms(ttft[:n_burst], 99),
        "tail_ttft_p50_ms": _ms(ttft[n_burst:], 50),
        "tail_ttft_p99_ms": _ms(ttft[n_burst:], 99),
        "tokens": tokens,
        "tokens_per_s": round(tokens / run["elapsed_s"], 1),
        "elapsed_s": round(run["elapsed_s"], 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Start both servers, run the rounds, report; exit 1 when outputs differ."""
    p = argparse.ArgumentParser(prog="python -m bench.adaptive_ab", description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("out/zen-llama/onnx-static"))
    add_model_args(p)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--ttft-target", type=float, default=500, help="adaptive's target, ms")
    p.add_argument("--serve-flags", default="", help="more flags for both servers")
    p.add_argument("--burst", type=int, default=32, help="clients arriving at once")
    p.add_argument("--burst-prompt-tokens", type=int, default=160)
    p.add_argument("--tail", type=int, default=16, help="short requests after the burst")
    p.add_argument("--tail-prompt-tokens", type=int, default=8)
    p.add_argument("--tail-delay", type=float, default=0.5, help="s from the burst to the tail")
    p.add_argument("--tail-gap", type=float, default=0.1, help="s between tail requests")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="bursts per server, alternating")
    p.add_argument("--out", type=Path, default=Path("out/load"))
    args = p.parse_args(argv)
    if args.model:
        args.artifact, _ = smollm_artifacts(args.work, args.max_context)
    args.clients = [args.burst + args.tail]  # kiln_command's --max-queue
    prompts = _prompts(args, _vocab(args.artifact))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    urls: dict[str, str] = {}
    commands: dict[str, list[str]] = {}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in SERVERS}
    metrics: dict[str, list[dict[str, float]]] = {name: [] for name in SERVERS}
    base_flags = args.serve_flags
    try:
        for name in SERVERS:
            extra = f" --adaptive --ttft-target {args.ttft_target:g}" if name == "adaptive" else ""
            args.serve_flags = base_flags + extra
            commands[name] = kiln_command(args, free_port())
            procs[name], urls[name] = _start(commands[name], "kiln")
        health = _get(f"{urls['fixed']}/health")
        for i in range(args.rounds):
            for name in SERVERS if i % 2 == 0 else SERVERS[::-1]:
                model = served_model(urls[name])
                before = _adaptive_counts(urls[name])
                run = asyncio.run(_burst(urls[name], model, args, prompts))
                after = _adaptive_counts(urls[name])
                runs[name].append(run)
                metrics[name].append(
                    {
                        k: v - before.get(k, 0.0) if k.startswith("decisions_") else v
                        for k, v in after.items()
                    }
                )
                print(f"[adaptive-ab] round {i + 1} {name}: {_figures(run, args.burst)}",
                      file=sys.stderr)  # fmt: skip
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return _report(args, health, commands, runs, metrics)


def _texts(run: dict[str, Any]) -> list[str]:
    return [r["text"] for r in run["results"]]


def _report(
    args: argparse.Namespace,
    health: dict[str, Any],
    commands: dict[str, list[str]],
    runs: dict[str, list[dict[str, Any]]],
    metrics: dict[str, list[dict[str, float]]],
) -> int:
    fixed0 = _texts(runs["fixed"][0])
    n = len(fixed0)
    same = {
        "adaptive_vs_fixed": [sum(a == b for a, b in zip(fixed0, _texts(r), strict=True))
                              for r in runs["adaptive"]],
        "fixed_vs_fixed": [sum(a == b for a, b in zip(fixed0, _texts(r), strict=True))
                           for r in runs["fixed"][1:]],
    }  # fmt: skip
    rows = {name: [_figures(r, args.burst) for r in runs[name]] for name in SERVERS}
    print(
        f"model {health.get('model')} on {health.get('backend')}, {health.get('slots')} slots; "
        f"burst of {args.burst} x {args.burst_prompt_tokens}-token prompts, then {args.tail} x "
        f"{args.tail_prompt_tokens}-token prompts {args.tail_gap:g} s apart; {args.max_tokens} "
        f"greedy tokens each; adaptive --ttft-target {args.ttft_target:g} ms; {args.rounds} "
        f"rounds, alternating; {os.cpu_count()} CPUs (clients share them); load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    keys = list(rows["fixed"][0])
    print(" | ".join(["server", "round", *keys]))
    print(" | ".join("---" for _ in range(len(keys) + 2)))
    for name in SERVERS:
        for i, r in enumerate(rows[name]):
            print(" | ".join([name, str(i + 1), *(str(r[k]) for k in keys)]))
    for name in SERVERS:
        med = {k: float(np.median([r[k] for r in rows[name]])) for k in keys}
        print(f"{name} median over rounds: " + ", ".join(f"{k} {v:g}" for k, v in med.items()))
    print("adaptive decisions per round (from /metrics):", json.dumps(metrics["adaptive"]))
    print(f"equal outputs of {n} requests: {json.dumps(same)}")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "adaptive_ab.json"
    report = {
        "server": health,
        "commands": commands,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "rounds": rows,
        "adaptive_metrics": metrics["adaptive"],
        "equal_outputs": {**same, "of": n},
        "load_avg_1m": os.getloadavg()[0],
    }
    write_json_atomic(out, report)
    print(f"[adaptive-ab] wrote {out}", file=sys.stderr)
    if any(k != n for k in same["adaptive_vs_fixed"]):
        print("[adaptive-ab] adaptive changed an output (see equal_outputs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
