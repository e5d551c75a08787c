"""Continuous batching under load: 32 streams, a client that leaves, a full queue, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx2 as httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from server_helpers import metric, slow_loader, start_server

from kiln.models.zen import zen_text


def _prompts(n: int) -> list[str]:
    """Openings of the text's lines, 1 to 12 words: prompts of different lengths."""
    lines = [ln for ln in zen_text().splitlines() if ln.strip()]
    return [" ".join(lines[i % len(lines)].split()[: 1 + i % 12]) for i in range(n)]


async def _stream(client: AsyncOpenAI, prompt: str, seed: int) -> tuple[str, str]:
    stream = await client.completions.create(
        model="zen-llama", prompt=prompt, max_tokens=24, temperature=0.9, seed=seed, stream=True
    )
    text, reason = [], None
    async for chunk in stream:
        text.append(chunk.choices[0].text)
        reason = chunk.choices[0].finish_reason or reason
    return "".join(text), reason


def test_32_concurrent_streams_equal_each_request_alone(zen_server):
    """32 clients at once over 4 slots: all complete, each output as when run alone."""
    prompts = _prompts(32)

    async def run(concurrent: bool) -> list[tuple[str, str]]:
        client = AsyncOpenAI(base_url=f"{zen_server.url}/v1", api_key="x", max_retries=0)
        try:
            if concurrent:
                return await asyncio.gather(*(_stream(client, p, i) for i, p in enumerate(prompts)))
            return [await _stream(client, p, i) for i, p in enumerate(prompts)]
        finally:
            await client.close()

    steps_before = zen_server.state.scheduler.steps
    alone = asyncio.run(run(concurrent=False))
    steps_alone = zen_server.state.scheduler.steps - steps_before
    batch_before = metric(zen_server.url, "kiln_batch_size_sum")
    together = asyncio.run(run(concurrent=True))
    steps_together = zen_server.state.scheduler.steps - steps_before - steps_alone
    assert together == alone
    assert all(reason in ("stop", "length") for _, reason in together)
    assert len({text for text, _ in alone}) > 16  # different outputs, not one repeated text
    # Batching happened: about 4 slots per step, so far fewer steps than run alone.
    assert steps_together < steps_alone / 2
    fed = metric(zen_server.url, "kiln_batch_size_sum") - batch_before
    assert fed / steps_together > 2.5


def test_client_that_leaves_after_3_chunks_frees_its_slot(zen_server):
    url = zen_server.url
    cancelled = metric(url, "kiln_sequences_finished_total", reason="cancelled")
    generated = metric(url, "kiln_generated_tokens_total")
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    stream = client.completions.create(
        model="zen-llama", prompt="Now is", max_tokens=370, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert metric(url, "kiln_active_sequences") == 1
    stream.close()
    deadline = time.monotonic() + 10
    while metric(url, "kiln_active_sequences") != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "kiln_active_sequences") == 0
    assert metric(url, "kiln_sequences_finished_total", reason="cancelled") == cancelled + 1
    assert metric(url, "kiln_generated_tokens_total") - generated < 370  # stopped early


@pytest.fixture
def one_slot_server(tiny_static):
    """One slot and no waiting room: a second request while one runs is over the limit."""
    srv = start_server(tiny_static, loader=slow_loader(tiny_static, slots=1), max_queue=0)
    yield srv
    srv.stop()


def _long_stream(url: str) -> httpx.Response:
    """Start a 250-token stream (>= 2.5 s on SlowSteps) and return at its first chunk."""
    client = httpx.Client(timeout=60)
    body = {"prompt": [1, 2, 3], "max_tokens": 250, "stream": True, "ignore_eos": True}
    r = client.send(client.build_request("POST", f"{url}/v1/completions", json=body), stream=True)
    lines = r.iter_lines()
    next(ln for ln in lines if ln.startswith("data: "))
    r.lines = lines  # type: ignore[attr-defined]
    r.owner = client  # type: ignore[attr-defined]  # keep the connection open
    return r


def _rest(r: httpx.Response) -> list[str]:
    return [ln for ln in r.lines if ln.startswith("data: ")]  # type: ignore[attr-defined]


def test_full_queue_answers_429_with_retry_after(one_slot_server):
    url = one_slot_server.url
    running = _long_stream(url)
    busy = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert busy.status_code == 429
    assert busy.headers["retry-after"] == "1"
    assert "retry after 1 s" in busy.json()["error"]["message"]
    assert busy.json()["error"]["code"] == "queue_full"
    assert _rest(running)[-1] == "data: [DONE]"  # the running stream was not disturbed
    ok = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert ok.status_code == 200  # control: with the slot free again, the same request runs


def test_non_streamed_client_that_times_out_frees_its_slot(one_slot_server):
    """A client gives up on a 250-token (>= 2.5 s) request after 0.3 s: its slot is freed."""
    url = one_slot_server.url
    body = {"prompt": [1, 2, 3], "max_tokens": 250, "ignore_eos": True}
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.3)
    while metric(url, "kiln_active_sequences") != 0 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert metric(url, "kiln_active_sequences") == 0
    assert metric(url, "kiln_sequences_finished_total", reason="cancelled") == 1
    assert metric(url, "kiln_generated_tokens_total") < 250  # stopped before its own end


def test_shutdown_finishes_running_requests_and_refuses_new_ones(one_slot_server):
    url = one_slot_server.url
    running = _long_stream(url)
    one_slot_server.shutdown()  # as SIGTERM
    refused = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert refused.status_code == 503
    assert "shutting down" in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/health").json() == {"status": "draining"}
    events = _rest(running)
    assert events[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in events[-2]  # all 250 tokens, not cut short
    assert len(events) == 250  # 249 more chunks + [DONE] (the first chunk was read before)
    one_slot_server.join(30)
    with pytest.raises(httpx.ConnectError):  # then the server closed
        httpx.get(f"{url}/health")


def test_health_is_503_until_loaded_and_warmed_up(tiny_static):
    from kiln.runtime.server.serve import slots_loader

    gate = threading.Event()
    load = slots_loader(tiny_static, slots=1, backend="auto", device="cpu", threads=1)
    srv = start_server(tiny_static, loader=lambda: (gate.wait(30), load())[1], wait=False)
    try:
        assert httpx.get(f"{srv.url}/health").json() == {"status": "loading"}
        early = httpx.post(f"{srv.url}/v1/completions", json={"prompt": [1], "max_tokens": 1})
        assert early.status_code == 503
        assert "poll GET /health" in early.json()["error"]["message"]
        gate.set()
        assert srv.state.ready.wait(30)
        assert httpx.get(f"{srv.url}/health").status_code == 200
    finally:
        gate.set()
        srv.stop()


class FailOnToken:
    """The real backend, but a step feeding token 299 raises (a fault in the graph call)."""

    def __init__(self, backend) -> None:
        self._backend = backend

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def step(self, feeds):
        if any(299 in f.tokens for f in feeds):
            raise RuntimeError("injected fault")
        return self._backend.step(feeds)


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(tiny_static):
    from kiln.runtime.server.serve import slots_loader

    load = slots_loader(tiny_static, slots=2, backend="auto", device="cpu", threads=1)

    def faulty():
        gen = load()
        gen.backend = FailOnToken(gen.backend)
        return gen

    srv = start_server(tiny_static, loader=faulty)
    try:
        url = f"{srv.url}/v1/completions"
        plain = httpx.post(url, json={"prompt": [299, 1], "max_tokens": 3})
        assert plain.status_code == 500
        assert "injected fault" in plain.json()["error"]["message"]
        body = {"prompt": [299, 1], "max_tokens": 3, "stream": True}
        with httpx.stream("POST", url, json=body) as r:
            events = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
        assert '"type": "server_error"' in events[0]
        assert events[-1] == "data: [DONE]"
        ok = httpx.post(url, json={"prompt": [1, 2], "max_tokens": 3})  # control
        assert ok.status_code == 200
        assert metric(srv.url, "kiln_active_sequences") == 0
        assert metric(srv.url, "kiln_sequences_finished_total", reason="error") == 2
    finally:
        srv.stop()
