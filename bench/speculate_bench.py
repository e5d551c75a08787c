"""Speculative decoding and prefix reuse, measured: decode tok/s and chat TTFT, interleaved.

Decode: each runner generates the same number of tokens (greedy, EOS ignored) from the same
prompt ids for a grounded prompt (the text is in the prompt and the answer starts it over) and
a free one (the answer is not in the prompt). Runners: kiln plain, kiln n-gram speculation per
k, kiln with a draft artifact (the int4 `kiln optimize` of the target), and llama.cpp's own
decoding on a GGUF of the same weights (llama-server: plain, its n-gram lookup per k, its Q4_0
draft model; bench/speculate_llamacpp.py says how and why). Decode tok/s is (new tokens - 1) /
(last token - first token) for every runner (llama.cpp's figures are the server's own, the same
definition). Each runner's speculative output is checked against its own plain greedy output.
Chat: a multi-turn exchange through kiln's `Generator.stream`, with and without a prefix cache;
TTFT is the time from the call to the first event. Runners alternate round-robin over
--repeats, so they share the machine's noise; the load average is printed beside them.

usage: python -m bench.speculate_bench --model smollm|eval-llama|zen-llama [--out out/speculate]
       python -m bench.speculate_bench --artifact STATIC [--draft ARTIFACT] [--hf HF_DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.llamacpp_runner import hf_to_gguf, missing
from bench.speculate_llamacpp import LlamaServer, runner_flags
from kiln.models.zen import ZEN_DIR, ZEN_PROMPT, zen_text
from kiln.runtime import Generator, load
from kiln.runtime.prefix_cache import PrefixCache
from kiln.runtime.speculate import SpecStats, Speculator, load_speculator

EVAL_DIR = Path(__file__).resolve().parent.parent / "models" / "eval-llama"


@dataclass
class Tally:
    """What one runner did on one workload over the repeats."""

    wall: list[float] = field(default_factory=list)  # decode tok/s per run
    cpu: list[float] = field(default_factory=list)  # tok per CPU-s (kiln only)
    outputs: list[list[int]] = field(default_factory=list)
    stats: SpecStats = field(default_factory=SpecStats)


# One decode run: (generated ids, tok/s, tok per CPU-s or None, what speculation did).
Run = tuple[list[int], float, float | None, SpecStats]


def kiln_run(gen: Generator, spec: Speculator | None, prompt: list[int], new: int) -> Run:
    """One greedy run of `new` tokens through kiln, timed from its first event to its last.

    On a loaded host the wall clock also counts waiting for a core; this process's CPU time
    counts only its own work (with one intra-op thread, the work of the decode loop itself).
    """
    gen.speculator = spec
    before = SpecStats(**vars(spec.stats)) if spec else None
    ids, stamps = [], []
    for e in gen.stream(prompt, max_new_tokens=new, ignore_eos=True):
        stamps.append((time.perf_counter(), time.process_time()))
        ids.append(e.token_id)
    gen.speculator = None
    (w0, c0), (w1, c1) = stamps[0], stamps[-1]
    if spec and before:
        a, b = spec.stats, before
        st = SpecStats(a.passes - b.passes, a.drafted - b.drafted, a.accepted - b.accepted,
                       a.emitted - b.emitted)  # fmt: skip
    else:
        st = SpecStats(passes=new - 1, emitted=new - 1)
    return ids, (new - 1) / (w1 - w0), (new - 1) / (c1 - c0), st


def llamacpp_run(server: LlamaServer, prompt: list[int], new: int) -> Run:
    """One greedy run of `new` tokens through a llama-server, with its own timings."""
    c = server.complete(prompt, new)
    st = SpecStats(passes=c.passes, drafted=c.drafted, accepted=c.accepted, emitted=new - 1)
    return c.tokens, c.tok_s, None, st


def prepare(model: str, work: Path, max_context: int) -> tuple[Path, Path, Path]:
    """(fp32 static export, its int4 ONNX Runtime optimize, HF folder) of a bench model."""
    from bench.race import make_model, static_int4

    hf = {"smollm": lambda: make_model("smollm", work / "hf"), "zen-llama": lambda: ZEN_DIR,
          "eval-llama": lambda: EVAL_DIR}[model]()  # fmt: skip
    static, int4 = static_int4(hf, work, max_context, model)
    return static, int4, hf


def workloads(gen: Generator, kind: str) -> dict[str, list[int]]:
    """Prompt ids of the grounded and the free workload.

    zen: the Zen of Python (zen-llama has memorised it, so its answer quotes the prompt; the
    SmolLM-shaped model uses the same tokenizer): grounded = 700 characters and their first 40
    again, free = `Beautiful is better than`. code: the eval model's held-out stdlib source
    (models/eval-llama/heldout.txt): grounded = 900 characters from the start of a line, a
    blank line and their first 120 characters again; free = 300 characters from the start of a
    later line, whose continuation is not in the prompt. The 1.8M-parameter eval model does
    not copy from its context (its greedy answers loop on their own), which the acceptance
    column shows.
    """
    if kind == "zen":
        text = zen_text()
        return {
            "grounded": gen.encode(text[:700] + "\n" + text[:40]),
            "free": gen.encode(ZEN_PROMPT),
        }
    text = (EVAL_DIR / "heldout.txt").read_text()
    a, b = (text.index("\n", at) + 1 for at in (3000, 40_000))
    head = text[a : a + 900]
    return {
        "grounded": gen.encode(head + "\n\n" + head[:120]),
        "free": gen.encode(text[b : b + 300]),
    }


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


def _prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = [i for i in range(n) if a[i] != b[i]]
    return diff[0] if diff else n


def table(
    tallies: dict[tuple[str, str], Tally], settings: dict[str, str], new: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows (JSON) and the markdown table: x its own plain, x kiln plain, same output."""
    head = ("| workload | runner | settings | decode tok/s, median (min-max) | x own plain | "
            "x kiln plain | tok per CPU-s | tok/pass | acceptance | = own plain |")  # fmt: skip
    lines, rows = [head, "|" + "---|" * 10], []
    for wl in dict.fromkeys(w for w, _ in tallies):
        kiln_plain = tallies[wl, "kiln plain"]
        for name in settings:
            t = tallies[wl, name]
            plain = tallies[wl, "llama.cpp plain" if name.startswith("llama.cpp") else "kiln plain"]
            mw = statistics.median(t.wall)
            same = all(o == plain.outputs[0] for o in t.outputs + plain.outputs)
            row: dict[str, Any] = {
                "workload": wl, "runner": name, "settings": settings[name], "new_tokens": new,
                "tok_s": t.wall, "tok_s_median": mw,
                "x_own_plain": mw / statistics.median(plain.wall),
                "x_kiln_plain": mw / statistics.median(kiln_plain.wall),
                "tok_per_cpu_s": t.cpu or None, "tokens_per_pass": t.stats.tokens_per_pass,
                "acceptance": t.stats.acceptance_rate if t.stats.drafted else None,
                "drafted": t.stats.drafted, "accepted": t.stats.accepted,
                "passes": t.stats.passes, "same_as_own_plain": same,
                "prefix_equal_to_kiln_plain": _prefix(t.outputs[0], kiln_plain.outputs[0]),
            }  # fmt: skip
            rows.append(row)
            cpu = f"{statistics.median(t.cpu):.0f}" if t.cpu else "-"
            acc = f"{row['acceptance']:.0%}" if row["acceptance"] is not None else "-"
            lines.append(
                f"| {wl} | {name} | {settings[name]} | {mw:.1f} ({min(t.wall):.1f}-"
                f"{max(t.wall):.1f}) | {row['x_own_plain']:.2f} | {row['x_kiln_plain']:.2f} | "
                f"{cpu} | {row['tokens_per_pass']:.2f} | {acc} | {'yes' if same else 'NO'} |"
            )
    return rows, lines


def main() -> None:
    """Run the decode race and the chat, print the tables and write them under --out."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", choices=["smollm", "eval-llama", "zen-llama"],
                     help="build the fp32 static export, its int4 draft and the GGUFs")  # fmt: skip
    src.add_argument("--artifact", type=Path, help="a static fp32 artifact (with --draft, --hf)")
    ap.add_argument("--draft", type=Path, default=None, help="kiln's draft artifact")
    ap.add_argument("--hf", type=Path, default=None,
                    help="the HF folder of --artifact, for llama.cpp's GGUFs (default: the "
                         "export manifest's source path)")  # fmt: skip
    ap.add_argument("--workload", choices=["zen", "code"], default=None,
                    help="prompt texts (default: code for eval-llama, zen otherwise)")  # fmt: skip
    ap.add_argument("--ks", default="4,8", help="n-gram draft lengths to run")
    ap.add_argument("--draft-k", type=int, default=4, help="draft-model draft length")
    ap.add_argument("--ngram-n", type=int, default=3, help="llama.cpp ngram-simple lookup size")
    ap.add_argument("--no-llamacpp", action="store_true", help="kiln's runners only")
    ap.add_argument(
        "--llama-flags", default="", help="more flags for every llama-server (--poll 0)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--turns", type=int, default=6, help="chat turns (0 or 1: no chat)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", choices=["on", "off"], default="on",
                    help="kiln's ONNX Runtime threads spin between ops (on: its best on a quiet "
                    "host, as llama.cpp's threads poll by default)")  # fmt: skip
    ap.add_argument("--max-context", type=int, default=512, help="of the static export")
    ap.add_argument("--out", type=Path, default=Path("out/speculate"))
    args = ap.parse_args()
    work = args.out / (args.model or args.artifact.name)
    if args.model:
        artifact, draft, hf = prepare(args.model, work, args.max_context)
    else:
        artifact, draft = args.artifact, args.draft
        hf = args.hf or Path(json.loads((artifact / "export.json").read_text())["source"]["path"])
    kind = args.workload or ("code" if hf.resolve() == EVAL_DIR else "zen")
    ks = [int(x) for x in args.ks.split(",")]
    spin = args.spin == "on"
    opts: dict[str, Any] = {"slots": 1, "spin": spin, "threads": args.threads, "last_only": False}
    gen = load(artifact, **opts)
    prompts = workloads(gen, kind)

    # kiln's runners: a Speculator per (workload, runner), so each keeps its own stats.
    kiln: dict[str, Callable[[], Speculator | None]] = {"kiln plain": lambda: None}
    t = f"threads {args.threads}, spin {args.spin}"
    settings = {"kiln plain": f"{t}, fp32 static"}
    for k in ks:
        kiln[f"kiln ngram k={k}"] = lambda k=k: load_speculator(gen, "ngram", draft_tokens=k)
        settings[f"kiln ngram k={k}"] = f"{t}, n-gram 3..1, k={k}"
    if draft:
        d = load_speculator(gen, str(draft), draft_tokens=args.draft_k, spin=spin,
                            threads=args.threads)  # fmt: skip
        name = f"kiln int4 draft k={args.draft_k}"
        kiln[name] = lambda: Speculator(d.drafter, draft_tokens=args.draft_k)
        settings[name] = f"{t}, draft {draft.name}, k={args.draft_k}"
    runs: dict[tuple[str, str], Callable[[list[int]], Run]] = {}
    for wl in prompts:
        for name, make in kiln.items():
            spec = make()
            runs[wl, name] = lambda p, s=spec: kiln_run(gen, s, p, args.new)

    servers: dict[str, LlamaServer] = {}
    why = missing() if not args.no_llamacpp else "--no-llamacpp"
    try:
        if why is None:
            gguf = work / "gguf"
            f32, q4 = hf_to_gguf(hf, gguf, "F32"), hf_to_gguf(hf, gguf, "Q4_0")
            n_ctx = -(-(max(map(len, prompts.values())) + args.new + 16) // 256) * 256
            for name, (what, flags) in runner_flags(ks, args.ngram_n, q4, args.draft_k).items():
                log = work / "logs" / (name.replace(" ", "_").replace("=", "") + ".log")
                server = servers[name] = LlamaServer(
                    f32, args.threads, n_ctx, [*flags, *args.llama_flags.split()], log
                )
                settings[name] = f"threads {args.threads}, {what}"
                for wl in prompts:
                    runs[wl, name] = lambda p, s=server: llamacpp_run(s, p, args.new)
        else:
            print(f"llama.cpp runners skipped: {why}")
        load_avg = [os.getloadavg()[0]]
        tallies: dict[tuple[str, str], Tally] = {key: Tally() for key in runs}
        for rep in range(args.repeats):
            for (wl, name), run in runs.items():
                ids, wall, cpu, st = run(prompts[wl])
                t = tallies[wl, name]
                t.wall.append(wall)
                t.cpu += [cpu] if cpu is not None else []
                t.outputs.append(ids)
                for f in ("passes", "drafted", "accepted", "emitted"):
                    setattr(t.stats, f, getattr(t.stats, f) + getattr(st, f))
            print(f"repeat {rep + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}")
    finally:
        for s in servers.values():
            s.close()
    ttft = chat(artifact, gen, opts, args) if args.turns > 1 else {}  # turn 1 is left out
    load_avg.append(os.getloadavg()[0])
    settings = {n: settings[n] for _, n in tallies}  # the runners that ran, in run order
    rows, lines = table(tallies, settings, args.new)
    title = (f"{artifact} ({kind} workload), {args.new} new tokens, {args.repeats} repeats, "
             f"load average {load_avg[0]:.1f} -> {load_avg[1]:.1f}")  # fmt: skip
    differ = [f"{r['workload']}/{r['runner']}" for r in rows if not r["same_as_own_plain"]]
    lines = [
        title,
        "",
        *lines,
        "",
        f"ids differing from their own plain greedy: {differ or 'none'}",
    ]
    lines += [
        f"chat TTFT p50, {n}: {v * 1e3:.1f} ms (turns after the first)" for n, v in ttft.items()
    ]
    print("\n".join(lines))
    report = {"artifact": str(artifact), "draft": str(draft), "hf": str(hf), "workload": kind,
              "prompt_tokens": {w: len(p) for w, p in prompts.items()}, "load_avg": load_avg,
              "threads": args.threads, "llamacpp": why or "ok", "decode": rows,
              "llamacpp_commands": {n: s.command for n, s in servers.items()},
              "chat_ttft_p50_s": ttft}  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("speculate.json", json.dumps(report, indent=1)),
        ("speculate.md", "\n".join(lines) + "\n"),
    ):
        tmp = work / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(work / name)
    print(f"wrote {work / 'speculate.md'} and speculate.json")


def chat(
    artifact: Path, gen: Generator, opts: dict[str, Any], args: argparse.Namespace
) -> dict[str, float]:
    """Chat TTFT p50 (s) cold and with a prefix cache, the chats alternating over --repeats."""
    warm = load(artifact, **opts)
    runs: dict[str, Callable[[int], list[float]]] = {
        "cold": lambda seed: chat_ttft(gen, args.turns, seed, 16),
        "prefix cache": lambda seed: chat_ttft(warm, args.turns, seed, 16),
    }
    ttft: dict[str, list[float]] = {}
    for rep in range(args.repeats):
        for name, run in runs.items():
            warm.prefix_cache = PrefixCache(warm.backend)  # each chat starts with an empty cache
            ttft.setdefault(name, []).extend(run(rep)[1:])  # turns after the first
    return {name: statistics.median(ts) for name, ts in ttft.items()}


if __name__ == "__main__":
    main()
