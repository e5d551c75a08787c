"""Response bodies and stream chunks in the OpenAI wire format (completions and chat)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from kiln.runtime.decode import Event
from kiln.runtime.tokenizer import Decoder


@dataclass
class Reply:
    """Builds one request's response objects; `chat` picks the chat.completion shapes.

    Each of the request's n choices is answered from its Events (runtime/decode.py), whose
    `index` is the choice's. Logprobs come in the endpoint's shape: completions the legacy
    `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists (`text_offset`: where
    each token's text starts in the choice's text), chat `logprobs.content` entries with the
    token's text, logprob, UTF-8 bytes and its top alternatives. A token's text is its decode
    alone (special tokens included); a token of a model without a tokenizer reads
    `token_id:N`, as vLLM's `return_tokens_as_token_ids`.
    """

    model: str
    chat: bool
    prompt_tokens: int
    tokenizer: Decoder | None = None
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    _offsets: dict[int, int] = field(default_factory=dict)  # per choice: text streamed so far

    def __post_init__(self) -> None:
        """Give the reply an id in OpenAI's style (cmpl-..., chatcmpl-...)."""
        prefix = "chatcmpl" if self.chat else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex[:24]}"

    def usage(self, completion_tokens: int) -> dict[str, int]:
        """Token counts: prompt (once, however many choices), completion (all choices), total."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def full(self, choices: list[list[Event]]) -> dict[str, Any]:
        """The non-streamed response: one choice per list of events.

        token_ids is an extension, as vLLM's return_token_ids.
        """
        out = []
        for i, events in enumerate(choices):
            text = "".join(e.text for e in events)
            reason = (events[-1].finish_reason if events else None) or "length"
            logprobs = self._logprobs(events) if events and events[0].logprobs else None
            if self.chat:
                message = {"role": "assistant", "content": text}
                choice: dict[str, Any] = {"index": i, "message": message}
            else:
                choice = {"index": i, "text": text}
            choice |= {"finish_reason": reason, "logprobs": logprobs}
            choice["token_ids"] = [e.token_id for e in events]
            out.append(choice)
        tokens = sum(len(events) for events in choices)
        return {**self._head(final=True), "choices": out, "usage": self.usage(tokens)}

    def role_chunk(self, index: int) -> str:
        """A chat stream's first chunk of choice `index`: the role, no text."""
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}}
        return sse({**self._head(final=False), "choices": [{**choice, "finish_reason": None}]})

    def chunk(self, event: Event) -> str:
        """One SSE event carrying a token's text piece (and the finish reason on the last one)."""
        logprobs = self._logprobs([event]) if event.logprobs else None
        if self.chat:
            delta: dict[str, Any] = {"content": event.text}
            choice: dict[str, Any] = {"index": event.index, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": event.index, "text": event.text, "logprobs": logprobs}
        choice["finish_reason"] = event.finish_reason
        choice["token_ids"] = [event.token_id]
        return sse({**self._head(final=False), "choices": [choice]})

    def usage_chunk(self, completion_tokens: int) -> str:
        """The last chunk of `stream_options.include_usage`: no choices, the counts."""
        return sse(
            {**self._head(final=False), "choices": [], "usage": self.usage(completion_tokens)}
        )

    def _logprobs(self, events: list[Event]) -> dict[str, Any]:
        """The logprobs object of these consecutive events of one choice (class doc)."""
        entries = [e.logprobs for e in events if e.logprobs is not None]
        if self.chat:
            content = [
                {
                    **self._token(lp.token_id, lp.logprob),
                    "top_logprobs": [self._token(t, v) for t, v in lp.top],
                }
                for lp in entries
            ]
            return {"content": content, "refusal": None}
        offsets = []
        for e in events:
            at = self._offsets.get(e.index, 0)
            offsets.append(at)
            self._offsets[e.index] = at + len(e.text)
        return {
            "tokens": [self._text(lp.token_id) for lp in entries],
            "token_logprobs": [lp.logprob for lp in entries],
            "top_logprobs": [{self._text(t): v for t, v in lp.top} for lp in entries],
            "text_offset": offsets,
        }

    def _token(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self._text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

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
