"""`make load RAY=1`: the single-process server against Ray Serve with 1 and 2 replicas.

Runs bench/loadtest.py's load level (`_level`: streaming openai completions, every token timed,
a new connection per request) at each client count against three targets: `kiln serve` in a
subprocess (bench/loadtest.py `kiln_command`), and one local Ray cluster whose kiln app is
redeployed with 1, then 2 engine replicas (runtime/server/ray_app.py). Each level sends prompts
no earlier level sent (the targets at one level share them; each Ray deployment is fresh).
Reports req/s, TTFT p50/p99 and tok/s per target and level, with the load average beside them.
`--kill` then runs the replica-kill experiment on 2 replicas: streams in flight, one replica
killed, each request counted as completed (retried or not), ended with an SSE error event, or
lost. Writes load_ray.json.

`--model smollm` serves the SmolLM-135M-shaped static int4 ONNX Runtime artifact that
bench/loadtest.py `--model smollm` builds (or reuses) in --work; `--prompt-tokens 128` sends
random token-id prompts. Each replica runs --threads ONNX Runtime threads, as the single-process
server does: 2 replicas at 2 threads on a 2-core host oversubscribe it (the output says so).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.loadtest import (
    Level,
    _level,
    _one,
    _prompts,
    _start,
    add_model_args,
    kiln_command,
    served_model,
    smollm_artifacts,
)
from kiln.artifacts import write_json_atomic

REPLICA_HEADER = "x-kiln-replica"
ATTEMPTS_HEADER = "x-kiln-attempts"
COLUMNS = ["server", "clients", "requests", "errors", "requests_per_s", "ttft_p50_ms",
           "ttft_p99_ms", "itl_p50_ms", "tokens_per_s", "load_avg_1m"]  # fmt: skip


def _deploy(args: argparse.Namespace, replicas: int, **scale_kw: object) -> float:
    """(Re)deploy the kiln app with `replicas` engine replicas; seconds until it is ready.

    The replicas' ONNX Runtime threads spin, as `kiln serve`'s do, while all replicas' threads
    fit the CPUs (up to the autoscaling maximum); more spinning threads than cores take turns
    burning each other's time, so then they block between ops instead.
    """
    from ray import serve

    from kiln.runtime.server.ray_app import APP_NAME, ScaleOptions, build_app
    from kiln.runtime.server.ray_replica import EngineSpec

    auto = scale_kw.get("autoscale")
    most = max(replicas, *auto) if isinstance(auto, tuple) else replicas
    spin = most * max(args.threads, 1) <= (os.cpu_count() or 1)  # `spins` in the report
    spec = EngineSpec(
        str(args.artifact), slots=args.slots, threads=args.threads, device="cpu", spin=spin
    )
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
    prompts = _prompts(args.prompt_tokens)
    counts = dict.fromkeys(("sent", "completed", "retried", "error_event", "lost"), 0)

    async def one(client: httpx.AsyncClient, i: int) -> None:
        prompt = prompts[(args.first + i) % len(prompts)]
        body = {"model": model, "prompt": prompt, "max_tokens": 64, "seed": i}
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
    prompts = _prompts(args.prompt_tokens)
    stop = False

    async def worker(w: int) -> None:
        i = 0
        while not stop:
            i += 1
            prompt = prompts[(args.first + 64 * w + i) % len(prompts)]
            await _one(client, model, prompt, i, args.max_tokens)

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
    """Measure the three targets; optionally the replica kill and autoscaling; write the report."""
    p = argparse.ArgumentParser(prog="python -m bench.load_ray", description=__doc__)
    p.add_argument("--artifact", type=Path, default=Path("out/zen-llama/onnx-static"))
    add_model_args(p)
    p.add_argument("--replicas", default="1,2", help="Ray replica counts, comma-separated")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per replica")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least clients)")
    p.add_argument("--duration", type=float, default=300, help="seconds per level (at most)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=0, help="random token-id prompts (0: text)")
    p.add_argument("--repeats", type=int, default=1, help="rounds over the targets")
    p.add_argument("--kill", action="store_true", help="then kill a replica under 32 streams")
    p.add_argument("--autoscale", action="store_true", help="then autoscale 1:2 under 32 streams")
    p.add_argument("--out", type=Path, default=Path("out/load"))
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]
    args.workload, args.turns, args.serve_flags = "single", 1, ""  # what loadtest's code reads
    replicas = [int(r) for r in args.replicas.split(",")]
    if args.model:
        args.artifact, _ = smollm_artifacts(args.work, args.max_context)
    args.artifact = args.artifact.resolve()
    cpus = os.cpu_count() or 1
    setting = (
        f"{args.artifact}, {args.slots} slots and {args.threads} ONNX Runtime threads per "
        f"replica (and single-process), {cpus} CPUs; "
        + (f"{args.prompt_tokens}-token id prompts" if args.prompt_tokens else "text prompts")
        + f", {args.max_tokens} tokens per request"
    )
    if max(replicas) * args.threads > cpus:
        setting += f" ({max(replicas)} replicas x {args.threads} threads oversubscribe the CPUs)"
    setting += (
        "; ONNX Runtime threads spin in the single process (kiln serve's default) and in the "
        "Ray replicas while replicas x threads fit the CPUs (else they block between ops)"
    )
    print(f"[load-ray] {setting}", file=sys.stderr)

    import ray
    from ray import serve

    from kiln.runtime.server.serve import free_port

    for attempt in (1, 2):  # on a loaded host the raylet may miss Ray's 30 s start window
        try:
            ray.init(
                address="local",
                num_cpus=max(cpus, max(replicas)),  # one logical CPU per engine replica
                include_dashboard=False,
                log_to_driver=False,
            )
            break
        except Exception as e:
            ray.shutdown()
            if attempt == 2:
                raise
            print(f"[load-ray] ray.init failed ({e}); once more", file=sys.stderr)
    proc, single_url = _start(kiln_command(args, free_port()), "kiln")
    port = free_port()
    rows: list[Level] = []
    report: dict = {"setting": setting, "cold_start_s": {}}
    first = 0  # the first prompt index of the next level: no level repeats an earlier prompt
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        ray_url = f"http://127.0.0.1:{port}"
        for rnd in range(args.repeats):
            starts = {}  # clients -> the level's first prompt, shared by the targets this round
            for c in args.clients:
                starts[c], first = first, first + max(args.requests, c)
            for n in replicas:
                report["cold_start_s"][f"ray-{n}-round{rnd}"] = round(_deploy(args, n), 1)
                for target, url in (("kiln", single_url), (f"ray-{n}", ray_url)):
                    if target == "kiln" and n != replicas[0]:
                        continue  # one single-process pass per round
                    pid = proc.pid if target == "kiln" else None
                    for c in args.clients:
                        req = max(args.requests, c)
                        level = _level(target, url, served_model(url), c, req, args, pid, starts[c])
                        rows.append(asyncio.run(level))
                        print(f"[load-ray] {rows[-1]}", file=sys.stderr)
        args.first = first
        if args.kill:
            _deploy(args, 2)
            report["kill"] = asyncio.run(_kill_run(ray_url, served_model(ray_url), args))
            print(f"[load-ray] replica kill: {report['kill']}", file=sys.stderr)
            args.first += 32
        if args.autoscale:
            _deploy(args, 1)  # back to one replica, then let the policy add one
            _deploy(args, 1, autoscale=(1, 2), upscale_delay_s=2.0)
            report["autoscale"] = asyncio.run(_autoscale_run(ray_url, served_model(ray_url), args))
            print(f"[load-ray] autoscale: {report['autoscale']}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        serve.shutdown()
        ray.shutdown()
    report |= {
        "max_tokens": args.max_tokens,
        "slots": args.slots,
        "threads_per_replica": args.threads,
        "prompt_tokens": args.prompt_tokens,
        "rows": [asdict(r) for r in rows],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / "load_ray.json"
    write_json_atomic(out, report)
    print(setting)
    print(" | ".join(COLUMNS))
    print(" | ".join("---" for _ in COLUMNS))
    for r in rows:
        print(" | ".join(str(getattr(r, name)) for name in COLUMNS))
    if "kill" in report:
        print("replica kill: " + ", ".join(f"{k} {v}" for k, v in report["kill"].items()))
    print(f"[load-ray] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
