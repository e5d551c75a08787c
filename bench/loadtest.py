"""`make load`: streaming clients against a kiln server on loopback, at several concurrencies.

Starts `kiln serve` on a free loopback port (or targets URL=, which must be loopback), then for
each client count runs a bounded number of streaming completions (and stops issuing new ones
after a bounded duration), with the official `openai` client. Reports requests/s, time to first
token p50/p99, inter-token latency p50/p99 and generated tokens/s, and where the kiln engine
thread's time went (`kiln_engine_seconds{phase}` from /metrics, as shares of the level's wall
time); prints a table and writes load.json. The clients share the machine with the server: on
a 2-core host they take CPU from it, so the figures are a floor.

`--model smollm` builds the SmolLM-135M-shaped model (random weights, bench/race.py) as a
static int4 ONNX Runtime artifact; `--peer llama-server` starts llama.cpp's server on the same
weights at Q4_0 (GGUF from bench/llamacpp_runner.py) and drives both with the same requests,
level by level in turn (both servers stay up; the idle one sleeps), so they share the noise.
`--prompt-tokens N` sends distinct seeded random token-id prompts of N tokens (no shared
prefix, so llama-server's prompt cache has nothing to reuse).
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from bench.llamacpp_runner import LLAMA_SERVER
from kiln.artifacts import write_json_atomic
from kiln.runtime.server.serve import free_port

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# llama.cpp's documented CPU settings (tools/server/README.md, tools/completion/README.md
# "Number of Threads": the physical core count for generation and batch threads); the rest at
# llama-server's defaults (continuous batching on, flash attention auto, ubatch 512, batch 2048).
LLAMA_SERVER_FLAGS = ("-np", "8", "-c", "4096", "-ngl", "0", "--no-webui")
PHASES = ("graph_prefill", "graph_decode", "graph_host", "sample", "accept", "emit", "plan")


@dataclass
class Level:
    """One concurrency level's figures."""

    server: str
    clients: int
    requests: int
    errors: int
    elapsed_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    decode_tok_s: float  # median over requests of (tokens - 1) / (last token - first token)
    tokens: int
    tokens_per_s: float
    mean_batch: float  # server side: slots fed per step
    engine_busy: float  # server side: fraction of the time inside graph steps
    server_cpu_ms_per_token: float | None  # CPU time of the server process (when started here)
    load_avg_1m: float  # os.getloadavg() when the level started (the host is shared)
    split: dict[str, float]  # kiln: engine-thread seconds per phase / wall time (idle: rest)
    round: int = 0  # --repeats: which round of this level


async def _one(
    client: object,
    model: str,
    prompt: str | list[int],
    seed: int,
    max_tokens: int,
    temperature: float = 0.8,
) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    pieces: list[str] = []
    usage = None
    stream = await client.completions.create(  # type: ignore[attr-defined]
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},  # every request generates max_tokens
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        for c in chunk.choices:  # kiln: one chunk per token (its text may be '')
            if c.text or c.finish_reason is None:  # not a bare closing chunk (llama-server)
                stamps.append(time.perf_counter())
                pieces.append(c.text)
    tokens = usage if usage is not None else len(stamps)
    return {"t0": t0, "stamps": stamps, "tokens": tokens, "text": "".join(pieces)}


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and all its threads (Linux /proc), else None."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


async def _level(
    server: str,
    url: str,
    model: str,
    clients: int,
    requests: int,
    args: argparse.Namespace,
    pid: int | None,
    first: int = 0,
) -> Level:
    """One concurrency level; request i sends prompt `first + i`.

    Each level starts where the last one's prompts ended, so no server meets a prompt it saw at
    an earlier level (llama-server keeps old prompts' KV in RAM, `--cache-ram`, and a repeated
    prompt would skip its prefill). Every request opens its own connection: llama-server's
    HTTP library closes kept-alive connections on its own schedule, and a client that reuses
    one just closed fails with a connection error; both servers get the same treatment.
    """
    prompts = _prompts(args.prompt_tokens)
    load_avg = os.getloadavg()[0]
    client = openai_client(url)
    todo = list(range(requests))
    results: list[dict] = []
    errors = 0
    before = _server_counts(url, server)
    cpu_before = _cpu_s(pid)
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal errors
        history, turn = "", 0  # --workload chat: this client's conversation so far
        while todo and time.perf_counter() - start < args.duration:
            i = todo.pop(0)
            prompt = prompts[(first + i) % len(prompts)]
            if args.workload == "chat":  # the next turn repeats the whole conversation
                history, turn = ("", 1) if turn == args.turns else (history, turn + 1)
                prompt = history = f"{history}{prompt}"
            try:
                r = await _one(client, model, prompt, i, args.max_tokens)
                results.append(r)
                history += f"{r['text']}\n" if args.workload == "chat" else ""
            except Exception as e:
                errors += 1
                print(f"request {i} failed: {e}", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()  # and its connection pool
    after = _server_counts(url, server)
    cpu_after = _cpu_s(pid)
    steps = after["steps"] - before["steps"]
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [d for r in results for d in np.diff(r["stamps"])]
    tokens = sum(r["tokens"] for r in results)
    split = {
        ph: round((after[ph] - before.get(ph, 0.0)) / elapsed, 3) for ph in PHASES if ph in after
    }
    return Level(
        server=server,
        clients=clients,
        requests=len(results),
        errors=errors,
        elapsed_s=round(elapsed, 2),
        requests_per_s=round(len(results) / elapsed, 2),
        ttft_p50_ms=_ms(ttft, 50),
        ttft_p99_ms=_ms(ttft, 99),
        itl_p50_ms=_ms(itl, 50),
        itl_p99_ms=_ms(itl, 99),
        decode_tok_s=_decode_rate(results),
        tokens=tokens,
        tokens_per_s=round(tokens / elapsed, 1),
        mean_batch=round((after["fed"] - before["fed"]) / max(steps, 1), 2),
        engine_busy=round((after["step_s"] - before["step_s"]) / elapsed, 2),
        server_cpu_ms_per_token=None
        if cpu_before is None or cpu_after is None or not tokens
        else round((cpu_after - cpu_before) / tokens * 1e3, 3),
        load_avg_1m=round(load_avg, 2),
        split=split,
    )


def _decode_rate(results: list[dict]) -> float:
    """Median decode tokens/s of the requests (first token to last): the rate a stream sees."""
    rates = [
        (len(r["stamps"]) - 1) / (r["stamps"][-1] - r["stamps"][0])
        for r in results
        if len(r["stamps"]) > 1 and r["stamps"][-1] > r["stamps"][0]
    ]
    return round(float(np.median(rates)), 1) if rates else float("nan")


async def paired_one_client(
    args: argparse.Namespace, url: str, model: str, first: int, rounds: int = 16
) -> dict[str, Any]:
    """The server at 1 client against its bare runtime, request by request, interleaved.

    The bare runtime is the same artifact, threads and spinning in this process (one slot,
    `Generator.stream`); each round sends prompt `first + i` with seed i to both, the order
    alternating, so both sides share the host's noise (a 2-core VM's speed drifts by 10-20%
    within minutes: a bare figure taken before the levels is no reference). Timed as `_level`
    times a stream; the texts must match (same prompt, seed and sampler on both sides).
    """
    from kiln.runtime import load

    gen = load(args.artifact, slots=1, threads=args.threads, spin=True, last_only=True)
    prompts = _prompts(args.prompt_tokens)
    client = openai_client(url)
    sides: dict[str, list[dict]] = {"bare": [], "kiln": []}
    same = 0
    for i in range(rounds):
        prompt = prompts[(first + i) % len(prompts)]
        for side in ("bare", "kiln") if i % 2 == 0 else ("kiln", "bare"):
            if side == "kiln":
                sides[side].append(await _one(client, model, prompt, i, args.max_tokens))
                continue
            t0, stamps, pieces = time.perf_counter(), [], []
            for event in gen.stream(
                prompt, max_new_tokens=args.max_tokens, temperature=0.8, seed=i, ignore_eos=True
            ):
                stamps.append(time.perf_counter())
                pieces.append(event.text)
            sides[side].append({"t0": t0, "stamps": stamps, "text": "".join(pieces)})
        same += sides["bare"][-1]["text"] == sides["kiln"][-1]["text"]
    await client.close()  # and its connection pool

    def figures(results: list[dict]) -> dict[str, float]:
        busy = sum(r["stamps"][-1] - r["t0"] for r in results)
        return {
            "tokens_per_s": round(sum(len(r["stamps"]) for r in results) / busy, 1),
            "decode_tok_s": _decode_rate(results),
            "ttft_p50_ms": _ms([r["stamps"][0] - r["t0"] for r in results], 50),
        }

    bare, kiln = figures(sides["bare"]), figures(sides["kiln"])
    return {
        "rounds": rounds,
        "bare": bare,
        "kiln": kiln,
        "decode_ratio": round(kiln["decode_tok_s"] / bare["decode_tok_s"], 3),
        "end_to_end_ratio": round(kiln["tokens_per_s"] / bare["tokens_per_s"], 3),
        "same_text": same,
        "settings": f"bare: kiln.runtime.load(slots=1, threads={args.threads}, spin=True), "
        "Generator.stream in the load tool's process; kiln: the started server over HTTP, "
        "the openai client; one request each per round, order alternating",
    }


def _server_counts(url: str, server: str) -> dict[str, float]:
    """Steps, slots fed, seconds in steps and per engine phase so far, from kiln's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {"kiln_batch_size_count": "steps", "kiln_batch_size_sum": "fed"}
    want["kiln_step_seconds_sum"] = "step_s"
    out = dict.fromkeys(want.values(), 0.0)
    if not server.startswith("kiln"):
        return out
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in want:
                out[want[sample.name]] = float(sample.value)
            elif sample.name == "kiln_engine_seconds_total":
                out[sample.labels["phase"]] = float(sample.value)
    return out


def _ms(values: list[float], q: int) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def _prompts(tokens: int = 0) -> list[str] | list[list[int]]:
    """Prompts, one per request index (cycled).

    tokens > 0: 1024 distinct seeded random token-id prompts of that length, ids in [300, 30000)
    (inside every bench vocabulary, clear of special tokens). Else the first words of each line
    of the bundled model's text: prompts of varied length.
    """
    if tokens > 0:
        rng = np.random.default_rng(0)
        return [rng.integers(300, 30000, tokens).tolist() for _ in range(1024)]
    from kiln.models.zen import zen_text

    lines = [ln for ln in zen_text().splitlines() if ln.strip()]
    return [" ".join(ln.split()[: 2 + i % 5]) for i, ln in enumerate(lines)]


def openai_client(url: str, timeout: float = 300) -> Any:
    """The official openai client on a loopback server: no retries, a new connection a request.

    `_level` says why no connection is kept alive; the client's `close()` closes its pool.
    """
    import httpx2 as httpx  # the HTTP library the openai client is built on
    from openai import AsyncOpenAI

    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=timeout)
    return AsyncOpenAI(
        base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=timeout, http_client=http
    )


def served_model(url: str) -> str:
    """The model id a server lists first at /v1/models."""
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        return str(json.loads(r.read())["data"][0]["id"])


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def kiln_command(args: argparse.Namespace, port: int) -> list[str]:
    """The `kiln serve` command line the load test starts."""
    cli = "import sys; from kiln.cli import main; sys.exit(main(sys.argv[1:]))"
    return [
        *(sys.executable, "-c", cli, "-q", "serve", str(args.artifact)),
        *("--port", str(port), "--slots", str(args.slots)),
        *("--max-queue", str(max(args.clients) + 8), "--threads", str(args.threads)),
        *([] if "--no-spin" in args.serve_flags.split() else ["--spin"]),  # the default, stated
        *args.serve_flags.split(),
    ]


def llama_command(args: argparse.Namespace, gguf: Path, port: int) -> list[str]:
    """The `llama-server` command line: the same slots and threads as kiln's server."""
    threads = str(args.threads or os.cpu_count() or 1)
    return [
        *(str(args.llama_server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)),
        *LLAMA_SERVER_FLAGS[:1],
        str(args.slots),
        *LLAMA_SERVER_FLAGS[2:],
        *("-t", threads, "-tb", threads),
        *args.llama_flags.split(),
    ]


def _start(cmd: list[str], name: str) -> tuple[subprocess.Popen, str]:
    """Start a server command (its port follows --port) and wait until /health says ok."""
    port = cmd[cmd.index("--port") + 1]
    print(f"[load] starting {name}: {' '.join(cmd)}", file=sys.stderr)
    env = dict(os.environ)
    if name != "kiln":  # llama.cpp's shared libraries sit beside its programs
        env["LD_LIBRARY_PATH"] = f"{Path(cmd[0]).parent}:{env.get('LD_LIBRARY_PATH', '')}"
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL if name != "kiln" else None,
                            stderr=subprocess.DEVNULL if name != "kiln" else None)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited with {proc.returncode} before it was ready")
        try:
            if _get(f"{url}/health").get("status") == "ok":
                return proc, url
        except OSError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit(f"{name} was not ready after 300 s")


def smollm_artifacts(work: Path, max_context: int) -> tuple[Path, Path]:
    """(static int4 ORT artifact, HF folder) of the SmolLM-135M-shaped bench model."""
    from bench.race import make_model, static_int4

    hf = make_model("smollm", work / "hf")
    return static_int4(hf, work, max_context, "smollm")[1], hf


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model / --max-context / --work: the bench model `smollm_artifacts` builds or reuses."""
    p.add_argument("--model", choices=["smollm"], default=None, help="build this bench model")
    p.add_argument("--max-context", type=int, default=256, help="--model's static slot length")
    p.add_argument("--work", type=Path, default=Path("out/load-smollm"), help="--model's folder")


def llama_gguf(args: argparse.Namespace, hf: Path | None) -> Path:
    """The Q4_0 GGUF llama-server loads: --gguf, or converted from the HF folder."""
    from bench.llamacpp_runner import build_gguf

    if args.gguf is not None:
        return Path(args.gguf)
    if hf is None:
        raise SystemExit("--peer llama-server needs --gguf FILE or --model smollm")
    gguf, why = build_gguf(hf, args.work / "gguf", "Q4_0")
    if gguf is None:
        raise SystemExit(f"--peer llama-server: no GGUF ({why})")
    return gguf


def main(argv: list[str] | None = None) -> int:
    """Run the load levels and report them."""
    p = argparse.ArgumentParser(prog="python -m bench.loadtest", description=__doc__)
    p.add_argument("--url", default=None, help="a running server on loopback (default: start one)")
    p.add_argument("--artifact", type=Path, default=Path("out/zen-llama/onnx-static"))
    p.add_argument("--slots", type=int, default=8, help="--slots of the started server")
    p.add_argument("--threads", type=int, default=0, help="--threads of the started server")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels, comma-separated")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at most)")
    p.add_argument("--duration", type=float, default=60, help="seconds per level (at most)")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds per level, the servers in turn (order alternating, fresh prompts each "
        "round): the report adds each level's median and the per-round kiln/peer ratios",
    )
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=0, help="random token-id prompts (0: text)")
    p.add_argument(
        "--workload",
        choices=["single", "chat"],
        default="single",
        help="single: independent requests; chat: each client's next request is its whole "
        "conversation so far (prompt, answer, next prompt; --turns per conversation)",
    )
    p.add_argument("--turns", type=int, default=4, help="--workload chat: turns per conversation")
    p.add_argument("--serve-flags", default="", help="more `kiln serve` flags, space-separated")
    add_model_args(p)
    p.add_argument("--peer", choices=["llama-server"], default=None, help="also drive this server")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER, help="the program")
    p.add_argument("--llama-flags", default="", help="more llama-server flags (e.g. --poll 0)")
    p.add_argument("--gguf", type=Path, default=None, help="llama-server's model (default: built)")
    p.add_argument(
        "--extra",
        action="append",
        default=[],
        help="NAME=URL: one more running loopback server driven in turn (e.g. kiln-before=...)",
    )
    p.add_argument("--out", type=Path, default=Path("out/load"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in str(args.clients).split(",")]
    hf = None
    if args.model:
        args.artifact, hf = smollm_artifacts(args.work, args.max_context)
    procs: dict[str, subprocess.Popen | None] = {}
    urls: dict[str, str] = {}
    commands: dict[str, list[str]] = {}
    try:
        if args.url:
            host = urlparse(args.url).hostname
            if host not in LOOPBACK:
                raise SystemExit(f"--url {args.url}: load runs against loopback only ({LOOPBACK}).")
            procs["kiln"], urls["kiln"] = None, args.url.rstrip("/")
        else:
            commands["kiln"] = kiln_command(args, free_port())
            procs["kiln"], urls["kiln"] = _start(commands["kiln"], "kiln")
        if args.peer and not args.llama_server.is_file():
            print(f"[load] no peer: {args.llama_server} is absent (build llama.cpp's tools "
                  "with cmake, or give --llama-server PATH)", file=sys.stderr)  # fmt: skip
        elif args.peer:
            commands[args.peer] = llama_command(args, llama_gguf(args, hf), free_port())
            procs[args.peer], urls[args.peer] = _start(commands[args.peer], args.peer)
        for extra in args.extra:
            name, _, url = extra.partition("=")
            if urlparse(url).hostname not in LOOPBACK:
                raise SystemExit(f"--extra {extra}: load runs against loopback only.")
            procs[name], urls[name] = None, url.rstrip("/")
        health = _get(f"{urls['kiln']}/health")
        levels, first, bare = [], 0, None
        for n in args.clients:  # servers in turn at each level: they share the host's noise
            req = max(args.requests, n)
            for rnd in range(args.repeats):  # fresh prompts each round; the order alternates
                for name, url in list(urls.items())[:: 1 if rnd % 2 == 0 else -1]:
                    model = served_model(url)
                    proc = procs[name]
                    pid = proc.pid if proc is not None else None
                    level = asyncio.run(_level(name, url, model, n, req, args, pid, first))
                    level.round = rnd
                    levels.append(level)
                    print(f"[load] {name}, {n} clients, round {rnd}: {level}", file=sys.stderr)
                first += req
            if n == 1 and not args.url:  # the other servers idle meanwhile
                model = served_model(urls["kiln"])
                bare = asyncio.run(paired_one_client(args, urls["kiln"], model, first))
                print(f"[load] kiln at 1 client vs its bare runtime: {bare}", file=sys.stderr)
                first += bare["rounds"]
    finally:
        for proc in procs.values():
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
    _report(levels, health, args, commands, bare)
    return 0


def _summary(levels: list[Level]) -> list[dict[str, Any]]:
    """Per server and client count: median tok/s and TTFT p50 over the rounds.

    For each other server, kiln's tok/s over its, round by round (a round shares the noise).
    """
    out = []
    for server in dict.fromkeys(lv.server for lv in levels):
        for n in dict.fromkeys(lv.clients for lv in levels):
            mine = [lv for lv in levels if lv.server == server and lv.clients == n]
            kiln = {lv.round: lv for lv in levels if lv.server == "kiln" and lv.clients == n}
            ratios = [round(kiln[lv.round].tokens_per_s / lv.tokens_per_s, 3) for lv in mine]
            out.append(
                {
                    "server": server,
                    "clients": n,
                    "tokens_per_s": round(float(np.median([lv.tokens_per_s for lv in mine])), 1),
                    "ttft_p50_ms": round(float(np.median([lv.ttft_p50_ms for lv in mine])), 1),
                    "kiln_over_it": "" if server == "kiln" else ratios,
                }
            )
    return out


def _report(
    levels: list[Level],
    health: dict,
    args: argparse.Namespace,
    commands: dict[str, list[str]],
    bare: dict[str, Any] | None = None,
) -> None:
    head = [f.name for f in fields(Level) if f.name != "split"]
    rows = [[getattr(lv, name) for name in head] for lv in levels]
    prompts = f"{args.prompt_tokens}-token id prompts" if args.prompt_tokens else "text prompts"
    if args.workload == "chat":
        prompts += f" in {args.turns}-turn conversations"
    print(
        f"model {health.get('model')} on {health.get('backend')}, {health.get('slots')} slots, "
        f"{prompts}, {args.max_tokens} tokens per request, {os.cpu_count()} CPUs (clients "
        "share them)"
    )
    for name, cmd in commands.items():
        print(f"{name}: {' '.join(cmd)}")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join(str(v) for v in r))
    if bare:
        b, k = bare["bare"], bare["kiln"]
        print(
            f"\nkiln serve at 1 client vs its bare runtime, {bare['rounds']} interleaved rounds "
            f"({bare['settings']}): decode {k['decode_tok_s']} vs {b['decode_tok_s']} tok/s "
            f"({bare['decode_ratio']:.0%}), end to end {k['tokens_per_s']} vs "
            f"{b['tokens_per_s']} tok/s ({bare['end_to_end_ratio']:.0%}), TTFT p50 "
            f"{k['ttft_p50_ms']} vs {b['ttft_p50_ms']} ms; same text in "
            f"{bare['same_text']}/{bare['rounds']} rounds."
        )
    summary = _summary(levels)
    if args.repeats > 1:
        print(f"\nmedian over {args.repeats} rounds (kiln / other: the ratio of each round):")
        print("server | clients | tokens_per_s | ttft_p50_ms | kiln / it, per round")
        print("--- | --- | --- | --- | ---")
        for row in summary:
            print(" | ".join(str(v) for v in row.values()))
    split = [lv for lv in levels if lv.split]
    if split:
        print("\nkiln engine thread, share of wall time per phase (rest: idle or waiting):")
        print(" | ".join(["clients", *PHASES]))
        print(" | ".join("---" for _ in range(len(PHASES) + 1)))
        for lv in split:
            print(" | ".join([str(lv.clients), *(str(lv.split.get(ph, "")) for ph in PHASES)]))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "load.json"
    report = {
        "server": health,
        "commands": commands,
        "prompt_tokens": args.prompt_tokens,
        "workload": args.workload,
        "max_tokens": args.max_tokens,
        "levels": [asdict(x) for x in levels],
        "summary": summary,
        "bare_runtime": bare,
    }
    write_json_atomic(out, report)
    print(f"[load] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
