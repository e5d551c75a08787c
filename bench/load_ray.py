"""`make load RAY=1`: the single-process server against Ray Serve with 1 and 2 replicas.

Runs bench/loadtest.py's streaming client (`_one`: one openai streamed completion, every token
timed) at each client count against three targets, round-robin so they share the machine's
noise: `kiln serve` in a subprocess, and one local Ray cluster whose kiln app is redeployed with
1, then 2 engine replicas (runtime/server/ray_app.py). Reports req/s, TTFT p50/p99 and tok/s per
target and level, with the load average beside them. `--kill` then runs the replica-kill
experiment on 2 replicas: streams in flight, one replica killed, each request counted as
completed (retried or not), ended with an SSE error event, or lost. Writes load_ray.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.loadtest import _ms, _one, _prompts, _start_server

REPLICA_HEADER = "x-kiln-replica"
ATTEMPTS_HEADER = "x-kiln-attempts"


@dataclass
class Row:
    """One (target, clients) measurement."""

    target: str
    clients: int
    requests: int
    errors: int
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tokens_per_s: float
    load_avg_1m: float


async def _level(url: str, model: str, target: str, clients: int, args: argparse.Namespace) -> Row:
    from openai import AsyncOpenAI

    prompts = _prompts()
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=300)
    todo = list(range(max(args.requests, clients)))
    results: list[dict] = []
    errors = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal errors
        while todo:
            i = todo.pop(0)
            try:
                p = prompts[i % len(prompts)]
                results.append(await _one(client, model, p, i, args.max_tokens))
            except Exception as e:
                errors += 1
                print(f"[load-ray] {target}: request {i} failed: {e}", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    await client.close()
    ttft = [r["stamps"][0] - r["t0"] for r in results if r["stamps"]]
    tokens = sum(len(r["stamps"]) for r in results)
    return Row(
        target=target,
        clients=clients,
        requests=len(results),
        errors=errors,
        requests_per_s=round(len(results) / elapsed, 2),
        ttft_p50_ms=_ms(ttft, 50),
        ttft_p99_ms=_ms(ttft, 99),
        tokens_per_s=round(tokens / elapsed, 1),
        load_avg_1m=os.getloadavg()[0],
    )


def _deploy(args: argparse.Namespace, replicas: int, **scale_kw: object) -> float:
    """(Re)deploy the kiln app with `replicas` engine replicas; seconds until it is ready."""
    from ray import serve

    from kiln.runtime.server.ray_app import APP_NAME, ScaleOptions, build_app
    from kiln.runtime.server.ray_replica import EngineSpec

    spec = EngineSpec(str(args.artifact), slots=args.slots, threads=args.threads, device="cpu")
    scale = ScaleOptions(replicas=replicas, max_queue=max(args.clients) * 4, **scale_kw)
    t0 = time.perf_counter()
    serve.run(build_app(spec, scale), name=APP_NAME, route_prefix="/")
    return time.perf_counter() - t0


async def _kill_run(url: str, model: str, args: argparse.Namespace) -> dict[str, int]:
    """32 streams on 2 replicas, one replica killed after 2 s: how each request ended."""
    import httpx2 as httpx
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    victim = sorted(n for n in names if "#KilnEngine#" in n)[0]
    prompts = _prompts()
    counts = dict.fromkeys(("sent", "completed", "retried", "error_event", "lost"), 0)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": 64, "seed": i}
        body |= {"stream": True, "ignore_eos": True}
        counts["sent"] += 1
        done = error = False
        async with client.stream("POST", "/v1/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: ") and '"error"' in line[:20]:
                    error = True
            attempts = int(r.headers.get(ATTEMPTS_HEADER, "1"))
        if done and error:
            counts["error_event"] += 1
        elif done and r.status_code == 200:
            counts["completed"] += 1
            counts["retried"] += attempts > 1
        else:
            counts["lost"] += 1

    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tasks = [asyncio.create_task(one(client, i)) for i in range(32)]
        await asyncio.sleep(2.0)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        await asyncio.gather(*tasks)
    return counts


async def _autoscale_run(url: str, model: str, args: argparse.Namespace) -> dict[str, float]:
    """Autoscale 1:2 under 32 streaming clients: seconds until the second replica is RUNNING."""
    from openai import AsyncOpenAI
    from ray import serve
    from ray.serve.schema import ReplicaState

    from kiln.runtime.server.ray_app import APP_NAME

    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="local", max_retries=0, timeout=300)
    prompts = _prompts()
    stop = False

    async def worker(w: int) -> None:
        i = 0
        while not stop:
            i += 1
            await _one(client, model, prompts[(w + i) % len(prompts)], i, args.max_tokens)

    def running() -> int:
        deployments = serve.status().applications[APP_NAME].deployments
        return int(deployments["KilnEngine"].replica_states.get(ReplicaState.RUNNING, 0))

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(worker(w)) for w in range(32)]
    scaled = float("nan")
    while time.perf_counter() - t0 < 120:
        await asyncio.sleep(0.5)
        if running() >= 2:
            scaled = time.perf_counter() - t0
            break
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    return {"second_replica_running_after_s": round(scaled, 1)}


def main(argv: list[str] | None = None) -> int:
    """Measure the three targets round-robin; optionally the replica kill; write the report."""
    p = argparse.ArgumentParser(prog="python -m bench.load_ray", description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("out/zen-llama/onnx-static"))
    p.add_argument("--replicas", default="1,2", help="Ray replica counts, comma-separated")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least clients)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="round-robin rounds")
    p.add_argument("--kill", action="store_true", help="then kill a replica under 32 streams")
    p.add_argument("--autoscale", action="store_true", help="then autoscale 1:2 under 32 streams")
    p.add_argument("--out", type=Path, default=Path("out/load"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.max_queue = max(args.clients) + 8
    replicas = [int(r) for r in args.replicas.split(",")]
    args.artifact = args.artifact.resolve()

    import ray
    from ray import serve

    from kiln.runtime.server.serve import free_port

    for attempt in (1, 2):  # on a loaded host the raylet may miss Ray's 30 s start window
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"[load-ray] ray.init failed ({e}); once more", file=sys.stderr)
    proc, single_url = _start_server(args)
    port = free_port()
    rows: list[Row] = []
    report: dict = {"cold_start_s": {}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_url = f"http://127.0.0.1:{port}"
        for rnd in range(args.repeats):
            for n in replicas:
                report["cold_start_s"][f"ray-{n}-round{rnd}"] = round(_deploy(args, n), 1)
                for target, url in (("single", single_url), (f"ray-{n}", ray_url)):
                    if target == "single" and n != replicas[0]:
                        continue  # one single-process pass per round
                    for c in args.clients:
                        row = asyncio.run(_level(url, _model(url), target, c, args))
                        rows.append(row)
                        print(f"[load-ray] {row}", file=sys.stderr)
        if args.kill:
            _deploy(args, 2)
            report["kill"] = asyncio.run(_kill_run(ray_url, _model(ray_url), args))
            print(f"[load-ray] replica kill: {report['kill']}", file=sys.stderr)
        if args.autoscale:
            _deploy(args, 1)  # back to one replica, then let the policy add one
            _deploy(args, 1, autoscale=(1, 2), upscale_delay_s=2.0)
            report["autoscale"] = asyncio.run(_autoscale_run(ray_url, _model(ray_url), args))
            print(f"[load-ray] autoscale: {report['autoscale']}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        serve.shutdown()
        ray.shutdown()
    report |= {
        "max_tokens": args.max_tokens,
        "slots": args.slots,
        "rows": [asdict(r) for r in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "load_ray.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)
    print(" | ".join(Row.__dataclass_fields__))
    for r in rows:
        print(" | ".join(str(v) for v in asdict(r).values()))
    print(f"[load-ray] wrote {out}", file=sys.stderr)
    return 0


def _model(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as r:
        return str(json.loads(r.read())["data"][0]["id"])


if __name__ == "__main__":
    sys.exit(main())
