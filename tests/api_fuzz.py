"""The API fuzzer: hypothesis bodies for kiln's OpenAI endpoints and the property every answer
must have, against any deployment of the API given by its base URL.

Bodies come from the request types of runtime/server/schemas.py: every field with values of the
right and the wrong types, boundary numbers (negative, zero, 2**63, 2**64, NaN, +-Infinity as
Python's json writes them), unicode edge cases (lone surrogates, NUL, emoji, RTL), junk keys and
unsupported fields; and raw bodies: truncated JSON, non-UTF-8 bytes, deep nesting, JSON that is
no object. Each goes over ONE keep-alive connection. Property: every answer is a 200 that the
openai package's types accept (every SSE event of a stream) or a 4xx in the OpenAI error shape
naming the field at fault; never a 5xx, and the connection stays open. After each run the
server is healthy and holds no sequence. Derandomized: the same bodies every run, so a failure
reproduces. Used by tests/runtime/server/test_server_fuzz.py (the single-process server) and
tests/runtime/ray/test_ray_api.py (the Ray Serve deployment).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import httpx2 as httpx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from live_metrics import metric
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk


def fuzz_settings(env: str, default: int) -> settings:
    """hypothesis settings: `default` examples per test, or the number in environment `env`."""
    return settings(
        derandomize=True,
        max_examples=int(os.environ.get(env, str(default))),
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


MODEL = "zen-llama"
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

# --- values -------------------------------------------------------------------------------------

EDGE_TEXT = [
    "\x00", "\ud800", "\udfff", "\udbff", "\udc00", "😀", "👩‍💻", "\u202e", "\u200f", "\u05d0",
    "\u0627", "\ufeff", "\uffff", "\U0010ffff", "\u0301", "\n", "\t", '"', "\\", "<|endoftext|>",
    "<|bos|>", "<|user|>", "{{ x }}", "{% if %}",
]  # fmt: skip
EDGE_INTS = [
    0, 1, -1, 2, 383, 384, 2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -(2**63),
    -(2**63) - 1, 2**64 - 1, 2**64, -(2**64), 10**30,
]  # fmt: skip
EDGE_FLOATS = [
    0.0, -0.0, 5e-324, 1e-45, 1e-30, 1e-8, 0.5, 1.0, 1.5, 2.0, 2.0000000000000004, 1e308,
    -1.0, math.nan, math.inf, -math.inf,
]  # fmt: skip

_piece = st.one_of(st.characters(), st.characters(), st.characters(), st.sampled_from(EDGE_TEXT))
texts = st.one_of(st.text(max_size=10), st.lists(_piece, max_size=10).map("".join))
ints = st.one_of(st.sampled_from(EDGE_INTS), st.integers(-5, 400), st.integers())
floats = st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(), st.floats(0, 2))
keys = st.one_of(st.text(max_size=8), st.text(max_size=8), texts)  # fewer lone surrogates
scalars = st.one_of(st.none(), st.booleans(), ints, floats, texts)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=6,
)
# Integers a length field may take without a long decode: small valid ones or invalid ones.
short_or_invalid = st.one_of(
    st.integers(1, 4),
    st.integers(max_value=0),
    st.integers(min_value=400),
    st.sampled_from(EDGE_INTS),
).filter(lambda n: not 4 < n < 400)


def _field(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's value: 9 in 10 a right one, else anything (wrong types, edge values)."""
    return st.integers(0, 9).flatmap(lambda i: good if i else junk)


prompts = st.one_of(
    texts.filter(bool),
    st.lists(st.integers(0, 383), min_size=1, max_size=6),  # token ids within the vocabulary
    st.sampled_from(["Beautiful is", ["Flat is"], [[1, 5, 9]]]),
    st.one_of(  # wrong: ids past the vocab, two prompts, empty ones, past the 384-token context
        st.lists(st.integers(-1, 400), max_size=6),
        st.lists(texts, max_size=2),
        st.lists(st.lists(st.integers(-1, 400), max_size=4), max_size=2),
        st.just("x" * 2000),
    ),
)
parts = st.fixed_dictionaries({"type": _field(st.just("text")), "text": _field(texts)})
message = st.fixed_dictionaries(
    {"role": _field(st.sampled_from(["user", "system", "assistant", "tool"]) | texts)},
    optional={"content": _field(texts | st.lists(parts, max_size=2) | st.none()), "name": junk},
)
messages = st.lists(message, min_size=1, max_size=3)  # [] comes from the wrong values
stops = st.one_of(st.none(), texts, st.lists(texts, max_size=5))
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "model": _field(st.sampled_from([MODEL, MODEL, "gpt-4o", ""]) | st.none()),
    "temperature": _field(st.floats(0, 2) | st.sampled_from([0, 1, 2, 5e-324, 1e-40]) | st.none()),
    "top_p": _field(st.floats(0, 1) | st.sampled_from([1, 5e-324]) | st.none()),
    "top_k": _field(st.sampled_from([-1, 0, 1, 5, 383, 384, 2**64]) | ints),
    "min_tokens": _field(st.integers(0, 3) | st.sampled_from(EDGE_INTS)),
    "repetition_penalty": _field(st.sampled_from([1, 1.3, 5e-324, 1e308, math.inf]) | floats),
    "ignore_eos": _field(st.booleans()),
    "stop": _field(stops),
    "seed": _field(st.sampled_from(EDGE_INTS) | ints | st.none()),
    "n": _field(st.sampled_from([1, None, 0, 2, 3, -1, 17])),
    "stream": _field(st.booleans() | st.none()),
    "stream_options": _field(st.none() | st.fixed_dictionaries({"include_usage": junk})),
    "logprobs": _field(st.sampled_from([None, False, True, 0, 5, 20, 21, -1])),
    "top_logprobs": _field(st.sampled_from([None, 0, 3, 20, 21])),
    "echo": _field(st.sampled_from([None, False, True])),
    "best_of": _field(st.sampled_from([None, 1, 2])),
    "suffix": _field(st.sampled_from([None, "", "x"])),
    "presence_penalty": _field(st.sampled_from([None, 0, 0.0, 0.5, 2, -2.5]) | floats),
    "frequency_penalty": _field(st.sampled_from([None, 0, 0.0, -2, 2.0000000000000004]) | floats),
    "logit_bias": _field(
        st.sampled_from([None, {}, {"5": 1}, {"5": -100}, {"383": 100.5}, {"384": 1}, {"x": 1}])
        | st.dictionaries(st.integers(-1, 400).map(str) | keys, floats, max_size=3)
    ),
    "stop_token_ids": _field(st.lists(st.integers(-1, 400), max_size=3) | st.none()),
    "response_format": _field(
        st.sampled_from(
            [
                None,
                {"type": "text"},
                {"type": "json_object"},
                {"type": "json_schema"},
                {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": {"type": "integer"}},
                },
                {"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}},
                {"type": "xml"},
            ]
        )
    ),
    "guided_regex": _field(st.sampled_from([None, "[ab]+", "(", ""]) | texts),
    "guided_choice": _field(st.none() | st.lists(texts, max_size=3)),
    "tools": _field(st.sampled_from([None, []])),
    "user": _field(texts),
}


@st.composite
def bodies(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    """A request body of `/v1/completions` or (chat) `/v1/chat/completions`."""
    body: dict[str, Any] = {}
    main = "messages" if chat else "prompt"
    if draw(st.integers(0, 19)):  # 1 in 20 leaves the required field out
        body[main] = draw(_field(messages if chat else prompts))
    if draw(st.integers(0, 3)):  # streamed or not: 3 in 4 bodies say which
        body["stream"] = draw(_field(st.sampled_from([True, False])))
    names = draw(st.lists(st.sampled_from(sorted(FIELDS)), max_size=6, unique=True))
    for name in names:
        body[name] = draw(FIELDS[name])
    # A short answer: max_tokens small (or invalid); chat falls back to max_completion_tokens
    # and then to the whole context, so one of the two is always short or invalid.
    if draw(st.booleans()) or chat:
        body["max_tokens"] = draw(st.one_of(short_or_invalid, st.none(), junk.filter(_not_int)))
    if chat and not isinstance(body.get("max_tokens"), int):
        body["max_completion_tokens"] = draw(short_or_invalid)
    for key, value in draw(st.dictionaries(keys, junk, max_size=2)).items():
        body.setdefault(key, value)
    return body


def _not_int(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)


@st.composite
def encoded(draw: st.DrawFn, chat: bool) -> tuple[dict[str, Any], bytes]:
    """A body and its bytes: ASCII-escaped JSON, or raw UTF-8 (lone surrogates as CESU bytes)."""
    body = draw(bodies(chat))
    if draw(st.booleans()):
        return body, json.dumps(body).encode()
    return body, json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def raw_bodies(draw: st.DrawFn) -> tuple[str, bytes]:
    """An endpoint and a body that is not a well-formed JSON object."""
    endpoint = draw(st.sampled_from(sorted(ENDPOINTS)))
    raw = json.dumps(draw(bodies(endpoint == "chat"))).encode()
    kind = draw(st.sampled_from(["truncated", "bad bytes", "nested", "not an object", "bytes"]))
    if kind == "truncated":
        raw = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif kind == "bad bytes":  # invalid UTF-8: stray, truncated, overlong, encoded surrogate
        bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"\xf8\x88"]))
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + bad + raw[at:]
    elif kind == "nested":
        depth = draw(st.sampled_from([10, 150, 300, 1000, 5000, 100_000]))
        inner = b"[" * depth + b"]" * depth
        raw = inner if draw(st.booleans()) else b'{"prompt": ' + inner + b"}"
    elif kind == "not an object":
        raw = json.dumps(draw(junk.filter(lambda v: not isinstance(v, dict)))).encode()
    else:
        raw = draw(st.binary(max_size=40))
    return endpoint, raw


# --- the property -------------------------------------------------------------------------------


class Fuzzer:
    """Posts bodies over one keep-alive connection and checks each answer."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = httpx.Client(base_url=url, timeout=60)
        self.local_addr: tuple[str, int] | None = None
        self.answers: dict[str, int] = {}  # by status and content type, for `pytest -s`

    def post(self, endpoint: str, raw: bytes) -> httpx.Response:
        """POST raw bytes; the answer must come over the same connection as every other."""
        r = self.client.post(
            ENDPOINTS[endpoint], content=raw, headers={"content-type": "application/json"}
        )
        kind = f"{r.status_code} {r.headers.get('content-type', '').split(';')[0]}"
        self.answers[kind] = self.answers.get(kind, 0) + 1
        addr = r.extensions["network_stream"].get_extra_info("client_addr")
        self.local_addr = self.local_addr or addr
        assert addr == self.local_addr, f"the connection was dropped before {raw[:200]!r}"
        return r

    def check(self, endpoint: str, raw: bytes, body: Any) -> None:
        """Post `raw` (`body`: what it decodes to, when known) and check the answer."""
        r = self.post(endpoint, raw)
        assert r.status_code < 500, f"{r.status_code} for {raw[:300]!r}: {r.text[:500]}"
        if r.status_code == 200:
            check_ok(r, endpoint == "chat", body)
        else:
            check_error(r, body)

    def assert_healthy(self) -> None:
        """After a run: /health 200 on the same connection, a plain request works, no sequence
        holds a slot, and no request got a 5xx."""
        health = self.client.get("/health")
        assert health.status_code == 200
        assert health.extensions["network_stream"].get_extra_info("client_addr") == self.local_addr
        ok = {"prompt": "Beautiful is", "max_tokens": 2, "temperature": 0}
        r = self.post("completions", json.dumps(ok).encode())
        assert r.status_code == 200
        assert Completion.model_validate(r.json()).usage.completion_tokens == 2
        deadline = time.monotonic() + 10
        while metric(self.url, "kiln_active_sequences") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(self.url, "kiln_active_sequences") == 0
        for path in ENDPOINTS.values():
            for status in ("500", "503"):
                assert metric(self.url, "kiln_requests_total", endpoint=path, status=status) == 0


def check_ok(r: httpx.Response, chat: bool, body: Any) -> None:
    """A 200: the body (or every SSE event of a stream) passes the openai package's types."""
    assert isinstance(body, dict)
    if body.get("stream") is not True:
        assert r.headers["content-type"] == "application/json"
        data = r.json()
        reply = (ChatCompletion if chat else Completion).model_validate(data)
        assert [c.index for c in reply.choices] == list(range(body.get("n") or 1))
        assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
        assert reply.usage is not None
        tokens = [len(c["token_ids"]) for c in data["choices"]]
        assert min(tokens) >= 1 and reply.usage.completion_tokens == sum(tokens)
        return
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", r.text[-300:]
    datas = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-2])
    for data in datas:
        assert "error" not in data, data  # an error after the headers: a 5xx in disguise
        choices = data["choices"]
        if not chat and choices and choices[0]["finish_reason"] is None:
            # OpenAI streams null there, which the Completion type does not allow
            choices = [{**choices[0], "finish_reason": "length"}]
        (ChatCompletionChunk if chat else Completion).model_validate({**data, "choices": choices})
    n = body.get("n") or 1
    for i in range(n):
        tokens = [d["choices"][0] for d in datas if d["choices"] and d["choices"][0]["index"] == i]
        assert len(tokens) >= (2 if chat else 1)  # chat: the role chunk, then one per token
        assert tokens[-1]["finish_reason"] in ("stop", "length")
        assert all(t["finish_reason"] is None for t in tokens[:-1])
    assert all(d["choices"][0]["index"] < n for d in datas if d["choices"])
    options = body.get("stream_options")
    usage = isinstance(options, dict) and options.get("include_usage") is True
    assert ("usage" in datas[-1]) == usage


def check_error(r: httpx.Response, body: Any) -> None:
    """A 4xx in the OpenAI error shape; on a JSON object, `param` names the field at fault."""
    assert 400 <= r.status_code < 500
    data = r.json()
    assert set(data) == {"error"}
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if isinstance(body, dict):
        # the fields of the body (keys as they print), and the required ones it may lack;
        # "prompt" also for chat, whose prompt is the rendered conversation
        fields = {_printable(k) for k in body} | {"prompt", "messages"}
        param = error["param"]
        assert isinstance(param, str), error
        assert any(param == f or param.startswith(f"{f}.") for f in fields), (param, body)


def _printable(key: str) -> str:
    return key.encode("utf-8", "backslashreplace").decode("utf-8")


def _decoded(raw: bytes) -> Any:
    """What the server decodes `raw` to (None when it is no JSON)."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


# --- the runs -----------------------------------------------------------------------------------

# The defects the fuzzer found, each run first on every run (then the generated bodies).
HI = [{"role": "user", "content": "hi"}]
FOUND = [
    ("chat", {"messages": HI, "seed": -1, "max_tokens": 1}),  # 500: numpy's seed range
    ("completions", {"prompt": "a", "max_tokens": 3, "temperature": 5e-324}),  # NaN probs
    ("completions", {"prompt": "a", "max_tokens": 3, "repetition_penalty": 5e-324}),  # NaN probs
    ("completions", {"prompt": [1], "max_tokens": 2, "repetition_penalty": 5e-324, "stream": True}),
    ("chat", {"messages": HI, "model": "\ud800", "max_tokens": 1}),  # param 'body'
    ("chat", {"messages": HI, "max_completion_tokens": -1}),  # param 'max_tokens'
    ("completions", {"": {"\ud800": None}}),  # the key path lost its empty parent
]
RAW_FOUND = [
    ("completions", b'{"prompt": ' + b"[" * 300 + b"]" * 300 + b"}"),  # param 'body'
    ("chat", b"[" * 100_000),  # 500: RecursionError in json.loads
]
KINDS = ("completions", "chat", "raw")


def fuzz(fuzzer: Fuzzer, kind: str, config: settings) -> None:
    """Post the FOUND bodies, then `config`'s generated ones of `kind` (one of KINDS), check
    each answer, and check the server's health after the run."""

    def check(case: tuple[str, bytes]) -> None:
        fuzzer.check(case[0], case[1], _decoded(case[1]))

    if kind == "raw":
        found, cases = RAW_FOUND, raw_bodies()
    else:
        found = [(kind, json.dumps(body).encode()) for endpoint, body in FOUND if endpoint == kind]
        cases = encoded(chat=kind == "chat").map(lambda case: (kind, case[1]))
    for case in found:
        check = example(case)(check)
    config(given(cases)(check))()
    fuzzer.assert_healthy()
    print(f"answers so far: {fuzzer.answers}")
