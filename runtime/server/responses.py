"""Response bodies and stream chunks in the OpenAI wire format (completions and chat)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    """Builds one request's response objects; `chat` picks the chat.completion shapes."""

    model: str
    chat: bool
    prompt_tokens: int
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        """Give the reply an id in OpenAI's style (cmpl-..., chatcmpl-...)."""
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex[:24]}"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        """Token counts: prompt, completion, total."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def full(self, text: str, token_ids: list[int], finish_reason: str) -> dict[str, Any]:
        """The non-streamed response (token_ids: an extension, as vLLM's return_token_ids)."""
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        choice["token_ids"] = token_ids
        return {
            **self._head(final=True),
            "choices": [choice],
            "usage": self.usage(len(token_ids)),
        }

    def chunk(
        self,
        text: str,
        finish_reason: str | None,
        *,
        token_id: int | None = None,
        first: bool = False,
    ) -> str:
        """One SSE event carrying a token's text piece (and the finish reason on the last one)."""
        if self.chat:
            delta: dict[str, Any] = {"content": text}
            if first:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        if token_id is not None:
            choice["token_ids"] = [token_id]
        return sse({**self._head(final=False), "choices": [choice]})

    def usage_chunk(self, completion_tokens: int) -> str:
        """The last chunk of `stream_options.include_usage`: no choices, the counts."""
        return sse(
            {**self._head(final=False), "choices": [], "usage": self.usage(completion_tokens)}
        )

    def _head(self, *, final: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion" if final else "chat.completion.chunk"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event with a JSON payload."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def error_body(
    message: str, *, kind: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_kind(status: int) -> str:
    """OpenAI's error type for a status code."""
    return {
        401: "authentication_error",
        404: "invalid_request_error",
        429: "rate_limit_exceeded",
        503: "service_unavailable",
    }.get(status, "invalid_request_error" if status < 500 else "server_error")
