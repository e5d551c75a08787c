"""Helpers of the Ray Serve tests: raw SSE reads (an error event must be seen, not raised)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx2 as httpx

from kiln.models.zen import zen_text


def prompts(n: int) -> list[str]:
    """Openings of the text's lines, 1 to 12 words: prompts of different lengths."""
    lines = [ln for ln in zen_text().splitlines() if ln.strip()]
    return [" ".join(lines[i % len(lines)].split()[: 1 + i % 12]) for i in range(n)]


@dataclass
class Streamed:
    """What a client saw of one streamed completion."""

    status: int
    headers: dict[str, str]
    text: str = ""
    finish_reason: str | None = None
    error: dict[str, Any] | None = None  # an SSE error event's "error" object
    done: bool = False  # `data: [DONE]` arrived
    chunks: int = 0
    body: str = ""  # a non-stream answer (errors before the stream)
    events: list[str] = field(default_factory=list)


async def stream_completion(
    client: httpx.AsyncClient,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    live: list[Streamed] | None = None,
) -> Streamed:
    """POST a streamed /v1/completions and read every SSE event until the connection ends.

    `live` gets the Streamed as soon as the headers arrive: a test can watch it fill.
    """
    async with client.stream(
        "POST", "/v1/completions", json={**body, "stream": True}, headers=headers
    ) as r:
        out = Streamed(r.status_code, dict(r.headers))
        if live is not None:
            live.append(out)
        if r.status_code != 200:
            out.body = (await r.aread()).decode()
            return out
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            out.events.append(data)
            if data == "[DONE]":
                out.done = True
                continue
            payload = json.loads(data)
            if "error" in payload:
                out.error = payload["error"]
                continue
            out.chunks += 1
            choice = payload["choices"][0]
            out.text += choice["text"]
            out.finish_reason = choice["finish_reason"] or out.finish_reason
    return out
