"""The OpenAI API through Ray Serve answers as the single-process server does (loopback only).

Each request with the fields of runtime/server/schemas.py beyond plain sampling (logprobs in both
shapes, penalties, logit_bias, n with seed, json_schema, guided_choice, stop_token_ids,
stream_options.include_usage with n), streamed and not, goes through the official openai client
to the Ray deployment (2 replicas of the bundled model) and to the single-process server over
the same static export, one request at a time: the two answers must be equal field for field
(ids and timestamps aside), logprobs included. Bad values get the same 400 in the OpenAI error
shape. Then tests/api_fuzz.py fuzzes the Ray deployment as it fuzzes the single-process server:
every answer a 200 or a 4xx in the OpenAI shape, never a 5xx or a hang.

Fuzz examples per kind: KILN_FUZZ_RAY_EXAMPLES, default 15 (45 generated bodies besides the
known ones, under a minute on 2 cores).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from api_fuzz import KINDS, Fuzzer, fuzz, fuzz_settings
from openai import OpenAI

from kiln.models.zen import ZEN_PROMPT
from kiln.runtime.server import LiveServer, ServerState
from kiln.runtime.server.serve import slots_loader

pytestmark = pytest.mark.ray
MODEL = "zen-llama"
HI = [{"role": "user", "content": "hi"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no way", "maybe"]
STOP_AT = 5  # stop_token_ids: the id of the plain greedy answer's token at this index
# name -> (endpoint, the create() arguments besides model); streamed and not unless STREAM_ONLY
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "completion logprobs": (
        "completions",
        {"prompt": "Errors should", "max_tokens": 8, "temperature": 1.0, "seed": 3, "logprobs": 3},
    ),
    "chat logprobs": (
        "chat",
        {
            "messages": HI,
            "max_tokens": 8,
            "temperature": 1.0,
            "seed": 3,
            "logprobs": True,
            "top_logprobs": 3,
        },
    ),
    "penalties": (
        "completions",
        {
            "prompt": ZEN_PROMPT,
            "max_tokens": 24,
            "temperature": 0,
            "presence_penalty": 1.5,
            "frequency_penalty": 1.0,
        },
    ),
    "logit_bias": (
        "chat",
        {"messages": HI, "max_tokens": 12, "temperature": 0, "logit_bias": {"5": 6, "9": -100}},
    ),
    "n with seed": (
        "completions",
        {"prompt": "Errors should", "max_tokens": 10, "temperature": 1.0, "seed": 11, "n": 3},
    ),
    "chat n with seed": (
        "chat",
        {"messages": HI, "max_tokens": 6, "temperature": 1.0, "seed": 1, "n": 2},
    ),
    "json_schema": (
        "chat",
        {
            "messages": [{"role": "user", "content": "Describe a person as JSON."}],
            "max_tokens": 80,
            "temperature": 1.0,
            "seed": 4,
            "n": 2,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON},
            },
        },
    ),
    "guided_choice": (
        "completions",
        {
            "prompt": "Errors",
            "max_tokens": 20,
            "temperature": 1.0,
            "seed": 2,
            "extra_body": {"guided_choice": CHOICES},
        },
    ),
    "stop_token_ids": (
        "completions",
        {"prompt": ZEN_PROMPT, "max_tokens": 30, "temperature": 0, "extra_body": {}},
    ),  # stop_token_ids filled in by the test (STOP_AT)
    "usage with n": (
        "completions",
        {
            "prompt": "Errors should",
            "max_tokens": 6,
            "temperature": 1.0,
            "seed": 7,
            "n": 2,
            "stream_options": {"include_usage": True},
        },
    ),
    "chat usage with n": (
        "chat",
        {
            "messages": HI,
            "max_tokens": 6,
            "temperature": 1.0,
            "seed": 7,
            "n": 2,
            "stream_options": {"include_usage": True},
        },
    ),
}
STREAM_ONLY = {"usage with n", "chat usage with n"}
# (endpoint, fields, the param the 400 names): one per validation path of the new fields
BAD = [
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("completions", {"logit_bias": {"384": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": "x"}}, "logit_bias.5"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"n": 17}, "n"),
    ("completions", {"stop_token_ids": [384]}, "stop_token_ids"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("chat", {"guided_choice": []}, "guided_choice"),
]


@pytest.fixture(scope="module")
def single(zen_static: Path) -> Iterator[str]:
    """The single-process server over the same export and settings as a Ray replica; its URL."""
    state = ServerState(
        slots_loader(zen_static, slots=4, backend="auto", device="cpu", threads=1),
        prefill_chunk=8,
    )
    server = LiveServer(state).start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def clients(kiln_ray: str, single: str) -> Iterator[tuple[OpenAI, OpenAI]]:
    """(through Ray, single-process)."""
    pair = tuple(OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0) for u in (kiln_ray, single))
    yield pair
    for c in pair:
        c.close()


def _answer(client: OpenAI, endpoint: str, kw: dict[str, Any], stream: bool) -> Any:
    """The answer as plain data without its id and timestamp: a dict, or a stream's chunk list."""
    create = client.chat.completions.create if endpoint == "chat" else client.completions.create
    drop = {"id", "created"}
    if stream:
        return [c.model_dump(exclude=drop) for c in create(model=MODEL, stream=True, **kw)]
    return create(model=MODEL, **kw).model_dump(exclude=drop)


def _texts(endpoint: str, answer: Any, stream: bool) -> list[str]:
    """The text of each choice."""
    if not stream:
        return [
            c["message"]["content"] if endpoint == "chat" else c["text"] for c in answer["choices"]
        ]
    texts: dict[int, str] = {}
    for chunk in answer:
        for c in chunk["choices"]:
            piece = (c["delta"]["content"] if endpoint == "chat" else c["text"]) or ""
            texts[c["index"]] = texts.get(c["index"], "") + piece
    return [texts[i] for i in sorted(texts)]


def _kwargs(name: str, clients: tuple[OpenAI, OpenAI]) -> tuple[str, dict[str, Any]]:
    endpoint, kw = CASES[name]
    if name == "stop_token_ids":
        plain = clients[1].completions.create(model=MODEL, **kw).choices[0]
        kw = {**kw, "extra_body": {"stop_token_ids": [plain.model_extra["token_ids"][STOP_AT]]}}
    return endpoint, kw


RUNS = [
    pytest.param(name, stream, id=f"{name}-{'stream' if stream else 'whole'}")
    for name in CASES
    for stream in (False, True)
    if stream or name not in STREAM_ONLY  # stream_options needs stream: true
]


@pytest.mark.parametrize(("name", "stream"), RUNS)
def test_same_answer_through_ray(clients, name, stream):
    endpoint, kw = _kwargs(name, clients)
    ray_answer, single_answer = (_answer(c, endpoint, kw, stream) for c in clients)
    assert ray_answer == single_answer
    texts = _texts(endpoint, ray_answer, stream)
    assert len(texts) == kw.get("n", 1) and all(texts)
    if name == "json_schema":
        for text in texts:
            jsonschema.validate(json.loads(text), PERSON)
    elif name == "guided_choice":
        assert texts[0] in CHOICES
    elif name == "stop_token_ids" and not stream:
        choice = ray_answer["choices"][0]
        assert choice["finish_reason"] == "stop" and len(choice["token_ids"]) == STOP_AT + 1
    elif name in STREAM_ONLY:
        assert ray_answer[-1]["choices"] == [] and ray_answer[-1]["usage"]["completion_tokens"] > 0


def test_a_different_seed_is_a_different_answer(clients):
    """Control: the equality above can fail (the same fields, another seed, differ)."""
    endpoint, kw = CASES["completion logprobs"]
    ray_answer = _answer(clients[0], endpoint, {**kw, "seed": 4}, stream=False)
    assert ray_answer != _answer(clients[1], endpoint, kw, stream=False)


@pytest.mark.parametrize(("endpoint", "fields", "param"), BAD)
def test_bad_values_get_the_same_400(clients, endpoint, fields, param):
    main = {"messages": HI} if endpoint == "chat" else {"prompt": "a"}
    kw = {**main, "max_tokens": 2, "extra_body": fields}
    errors = []
    for client in clients:
        with pytest.raises(openai.BadRequestError) as caught:
            _answer(client, endpoint, kw, stream=False)
        errors.append(caught.value.response.json())
    assert errors[0] == errors[1]
    error = errors[0]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    # control: the same request without the bad field is answered
    assert _answer(clients[0], endpoint, {**main, "max_tokens": 2}, stream=False)["choices"]


@pytest.fixture(scope="module")
def fuzzer(kiln_ray: str) -> Iterator[Fuzzer]:
    f = Fuzzer(kiln_ray)
    yield f
    f.client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_fuzzed_bodies_through_ray(fuzzer, kind):
    fuzz(fuzzer, kind, fuzz_settings("KILN_FUZZ_RAY_EXAMPLES", 15))
