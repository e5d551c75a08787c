"""kiln's server on Ray Serve, 2 replicas of the bundled model on a local cluster (loopback only).

The same requests answered by the single-process server one at a time are the reference: the
Ray deployment must give the same text under 32 concurrent streams spread over both replicas,
keep a session on its replica, answer 429 in the OpenAI shape when its queue is full, and lose
nothing when a replica is killed mid-load: each request completes as alone, or (a stream that
had started) ends with an SSE error event and [DONE], never a bare truncation. Last, deleting
the app drains: running streams finish.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI
from ray_helpers import Streamed, prompts, stream_completion

from kiln.runtime.server import LiveServer, ServerState
from kiln.runtime.server.ray_ingress import ATTEMPTS_HEADER
from kiln.runtime.server.ray_replica import REPLICA_HEADER
from kiln.runtime.server.serve import slots_loader

pytestmark = pytest.mark.ray
MODEL = "zen-llama"


@pytest.fixture(scope="module")
def alone(zen_static: Path):
    """Answers of the single-process server to one request at a time (memoized by body)."""
    state = ServerState(
        slots_loader(zen_static, slots=4, backend="auto", device="cpu", threads=1),
        prefill_chunk=8,
    )
    server = LiveServer(state).start()
    seen: dict[tuple, str] = {}

    def text(prompt: str, seed: int, max_tokens: int) -> str:
        key = (prompt, seed, max_tokens)
        if key not in seen:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "seed": seed}
            r = httpx.post(f"{server.url}/v1/completions", json={**body, "temperature": 0.9})
            r.raise_for_status()
            seen[key] = r.json()["choices"][0]["text"]
        return seen[key]

    try:
        yield text
    finally:
        server.stop()


def _body(prompt: str, seed: int, max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.9,
        "seed": seed,
    }


def _engine_replicas() -> dict[str, str]:
    """Replica id -> actor name of the live KilnEngine replicas."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    return {n.rsplit("#", 1)[1]: n for n in names if "#KilnEngine#" in n}


def test_32_openai_streams_spread_over_replicas_equal_each_alone(kiln_ray, alone):
    ps = prompts(32)

    async def one(client: AsyncOpenAI, i: int) -> tuple[str, str, str | None]:
        raw = await client.completions.with_raw_response.create(stream=True, **_body(ps[i], i, 16))
        text, reason = [], None
        async for chunk in raw.parse():
            text.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return raw.headers[REPLICA_HEADER], "".join(text), reason

    async def run() -> list[tuple[str, str, str | None]]:
        client = AsyncOpenAI(base_url=f"{kiln_ray}/v1", api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*(one(client, i) for i in range(32)))
        finally:
            await client.close()

    got = asyncio.run(run())
    assert [text for _, text, _ in got] == [alone(p, i, 16) for i, p in enumerate(ps)]
    assert all(reason in ("stop", "length") for _, _, reason in got)
    replicas = [replica for replica, _, _ in got]
    assert len(set(replicas)) == 2, replicas  # both replicas served
    assert min(replicas.count(r) for r in set(replicas)) >= 4


def test_session_header_keeps_a_conversation_on_its_replica(kiln_ray):
    sessions = [f"conversation-{i}" for i in range(12)]
    where: dict[str, set[str]] = {s: set() for s in sessions}
    with httpx.Client(base_url=kiln_ray, timeout=60) as client:
        for _ in range(3):
            for s in sessions:
                r = client.post(
                    "/v1/completions",
                    json=_body("The way", 0, 1),
                    headers={"x-session-id": s},
                )
                assert r.status_code == 200, r.text
                where[s].add(r.headers[REPLICA_HEADER])
    assert all(len(replicas) == 1 for replicas in where.values()), where
    assert len(set().union(*where.values())) == 2  # affinity per session, not one replica


def test_overload_gets_429_with_retry_after_in_openai_shape(kiln_ray):
    # 80 requests of 120 tokens: the first 12 hold their slots while the rest arrive
    long = {"ignore_eos": True}

    async def run() -> list[Streamed]:
        async with httpx.AsyncClient(base_url=kiln_ray, timeout=120) as client:
            return await asyncio.gather(
                *(stream_completion(client, _body("The way", i, 120) | long) for i in range(80))
            )

    got = asyncio.run(run())
    refused = [s for s in got if s.status == 429]
    served = [s for s in got if s.status == 200]
    assert len(refused) + len(served) == 80, [
        (s.status, s.body) for s in got if s.status not in (200, 429)
    ]
    assert refused and len(served) >= 12  # 2 x (4 slots + 2) running, 40 queued at most
    for s in refused:
        assert s.headers["retry-after"] == "1"
        err = httpx.Response(429, content=s.body).json()["error"]
        assert err["type"] == "rate_limit_exceeded" and err["code"] == "queue_full"
    assert all(s.done and s.error is None and s.finish_reason for s in served)


def test_replica_killed_mid_load_loses_nothing_and_is_replaced(kiln_ray, alone):
    import ray

    n, max_tokens = 24, 48
    ps = prompts(n)
    refs = [alone(p, 100 + i, max_tokens) for i, p in enumerate(ps)]
    before = _engine_replicas()
    assert len(before) == 2
    victim = sorted(before)[0]
    live: list[Streamed] = []

    async def run() -> list[Streamed]:
        async with httpx.AsyncClient(base_url=kiln_ray, timeout=120) as client:
            tasks = [
                asyncio.create_task(
                    stream_completion(client, _body(ps[i], 100 + i, max_tokens), live=live)
                )
                for i in range(n)
            ]
            # kill the victim once a stream it serves has sent 2 tokens (bounded wait)
            for _ in range(1200):
                if any(s.headers[REPLICA_HEADER] == victim and s.chunks >= 2 for s in live):
                    break
                await asyncio.sleep(0.05)
            ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=True)
            return await asyncio.gather(*tasks)

    got = asyncio.run(run())
    completed = retried = errored = 0
    for s, ref in zip(got, refs, strict=True):
        assert s.status == 200, s.body
        assert s.done, f"stream truncated without [DONE]: {s.events[-3:]}"
        if s.error is None:
            assert s.text == ref
            completed += 1
            retried += int(s.headers[ATTEMPTS_HEADER]) > 1
        else:
            assert s.error["code"] == "replica_died"
            assert ref.startswith(s.text)  # what it sent before dying was right
            errored += 1
    assert completed + errored == n
    assert errored >= 1  # the victim's started stream ended with the error event
    assert completed > errored
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        now = _engine_replicas()
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.5)
    assert len(now) == 2 and victim not in now, now
    print(
        f"replica kill: sent {n}, completed {completed} ({retried} retried), error event {errored}"
    )


def test_delete_drains_running_streams(kiln_ray, alone):
    """`serve.delete` (what SIGTERM runs in `kiln serve --ray`): started streams finish."""
    from ray import serve

    from kiln.runtime.server.ray_app import APP_NAME

    ps = prompts(6)
    refs = [alone(p, 200 + i, 32) for i, p in enumerate(ps)]

    async def run() -> list[Streamed]:
        async with httpx.AsyncClient(base_url=kiln_ray, timeout=120) as client:
            tasks = [
                asyncio.create_task(stream_completion(client, _body(p, 200 + i, 32)))
                for i, p in enumerate(ps)
            ]
            await asyncio.sleep(1.0)
            deleting = threading.Thread(target=serve.delete, args=(APP_NAME,))
            deleting.start()
            got = await asyncio.gather(*tasks)
            await asyncio.to_thread(deleting.join, 120)
            return got

    got = asyncio.run(run())
    assert [(s.status, s.error, s.done) for s in got] == [(200, None, True)] * 6
    assert [s.text for s in got] == refs
    assert APP_NAME not in serve.status().applications
