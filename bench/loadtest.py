"""`make load`: streaming clients against a kiln server on loopback, at several concurrencies.

Starts `kiln serve` on a free loopback port (or targets URL=, which must be loopback), then for
each client count runs a bounded number of streaming completions (and stops issuing new ones
after a bounded duration), with the official `openai` client. Reports requests/s, time to first
token p50/p99, inter-token latency p50/p99 and generated tokens/s; prints a table and writes
load.json. The clients share the machine with the server: on a 2-core host they take CPU from
it, so the figures are a floor.
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
from urllib.parse import urlparse

import numpy as np

from kiln.runtime.server.serve import free_port

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@dataclass
class Level:
    """One concurrency level's figures."""

    clients: int
    requests: int
    errors: int
    elapsed_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tokens: int
    tokens_per_s: float
    mean_batch: float  # server side: slots fed per step
    engine_busy: float  # server side: fraction of the time inside graph steps
    server_cpu_ms_per_token: float | None  # CPU time of the server process (when started here)


async def _one(client: object, model: str, prompt: str, seed: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    stream = await client.completions.create(  # type: ignore[attr-defined]
        model=model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.8,
        seed=seed,
        stream=True,
        extra_body={"ignore_eos": True},  # every request generates max_tokens
    )
    async for chunk in stream:
        if chunk.choices:  # one chunk per token (its text may be '': a special token)
            stamps.append(time.perf_counter())
    return {"t0": t0, "stamps": stamps}


def _cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and all its threads (Linux /proc), else None."""
    try:
        fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


async def _level(
    url: str, model: str, clients: int, requests: int, args: argparse.Namespace, pid: int | None
) -> Level:
    from openai import AsyncOpenAI

    prompts = _prompts()
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=300)
    todo = list(range(requests))
    results: list[dict] = []
    errors = 0
    before = _server_counts(url)
    cpu_before = _cpu_s(pid)
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal errors
        while todo and time.perf_counter() - start < args.duration:
            i = todo.pop(0)
            try:
                results.append(
                    await _one(client, model, prompts[i % len(prompts)], i, args.max_tokens)
                )
            except Exception as e:
                errors += 1
                print(f"request {i} failed: {e}", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    after = _server_counts(url)
    cpu_after = _cpu_s(pid)
    steps = after["steps"] - before["steps"]
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    itl = [d for r in results for d in np.diff(r["stamps"])]
    tokens = sum(len(r["stamps"]) for r in results)
    return Level(
        clients=clients,
        requests=len(results),
        errors=errors,
        elapsed_s=round(elapsed, 2),
        requests_per_s=round(len(results) / elapsed, 2),
        ttft_p50_ms=_ms(ttft, 50),
        ttft_p99_ms=_ms(ttft, 99),
        itl_p50_ms=_ms(itl, 50),
        itl_p99_ms=_ms(itl, 99),
        tokens=tokens,
        tokens_per_s=round(tokens / elapsed, 1),
        mean_batch=round((after["fed"] - before["fed"]) / max(steps, 1), 2),
        engine_busy=round((after["step_s"] - before["step_s"]) / elapsed, 2),
        server_cpu_ms_per_token=None
        if cpu_before is None or cpu_after is None or not tokens
        else round((cpu_after - cpu_before) / tokens * 1e3, 3),
    )


def _server_counts(url: str) -> dict[str, float]:
    """Steps, slots fed and seconds in steps so far, from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    want = {"kiln_batch_size_count": "steps", "kiln_batch_size_sum": "fed"}
    want["kiln_step_seconds_sum"] = "step_s"
    out = dict.fromkeys(want.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in want:
                out[want[sample.name]] = float(sample.value)
    return out


def _ms(values: list[float], q: int) -> float:
    return round(float(np.percentile(values, q)) * 1000, 1) if values else float("nan")


def _prompts() -> list[str]:
    """The first words of each line of the bundled model's text: prompts of varied length."""
    from kiln.models.zen import zen_text

    lines = [ln for ln in zen_text().splitlines() if ln.strip()]
    return [" ".join(ln.split()[: 2 + i % 5]) for i, ln in enumerate(lines)]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cli = "import sys; from kiln.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [
        *(sys.executable, "-c", cli, "-q", "serve", str(args.artifact)),
        *("--port", str(port), "--slots", str(args.slots)),
        *("--max-queue", str(max(args.clients) + 8), "--threads", str(args.threads)),
    ]
    print(f"[load] starting: {' '.join(cmd)}", file=sys.stderr)
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"kiln serve exited with {proc.returncode} before it was ready")
        try:
            if _get(f"{url}/health").get("status") == "ok":
                return proc, url
        except OSError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit("kiln serve was not ready after 180 s")


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
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--out", type=Path, default=Path("out/load"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in str(args.clients).split(",")]
    proc = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in LOOPBACK:
            raise SystemExit(f"--url {args.url}: load runs against loopback only ({LOOPBACK}).")
        url = args.url.rstrip("/")
    else:
        proc, url = _start_server(args)
    try:
        health = _get(f"{url}/health")
        model = _get(f"{url}/v1/models")["data"][0]["id"]
        levels = []
        for n in args.clients:
            pid = proc.pid if proc is not None else None
            level = asyncio.run(_level(url, model, n, max(args.requests, n), args, pid))
            levels.append(level)
            print(f"[load] {n} clients: {level}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    _report(levels, health, args)
    return 0


def _report(levels: list[Level], health: dict, args: argparse.Namespace) -> None:
    head = [f.name for f in fields(Level)]
    rows = [[getattr(lv, name) for name in head] for lv in levels]
    print(
        f"model {health.get('model')} on {health.get('backend')}, {health.get('slots')} slots, "
        f"{args.max_tokens} tokens per request, {os.cpu_count()} CPUs (clients share them)"
    )
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join(str(v) for v in r))
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "load.json"
    tmp = out.with_suffix(".json.tmp")
    report = {
        "server": health,
        "max_tokens": args.max_tokens,
        "levels": [asdict(x) for x in levels],
    }
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(f"[load] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
