"""Structured output through the official openai client: response_format json_schema and
json_object, guided_choice and guided_regex, sampled at temperature 1 over many seeds.

Every output that finishes ("stop") must parse and validate with `jsonschema`; the bounded schema
below always finishes within its max_tokens. The control: the same seeds without a format write
text that is no JSON.
"""

from __future__ import annotations

import json
import re

import httpx2 as httpx
import jsonschema
import pytest
from openai import OpenAI

from kiln.models.zen import ZEN_DIR
from kiln.runtime.tokenizer import Tokenizer

MODEL = "zen-llama"
SEEDS = range(40)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "score": {"anyOf": [{"type": "number"}, {"type": "null"}]},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def client(zen_server) -> OpenAI:
    return OpenAI(base_url=f"{zen_server.url}/v1", api_key="unused", max_retries=0)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def test_json_schema_outputs_validate_on_every_seed(client):
    fmt = _schema_format(PERSON)
    seen = set()
    for seed in SEEDS[::4]:  # 4 choices per request: seeds seed .. seed + 3
        r = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=120, temperature=1.0, seed=seed, n=4,
            response_format=fmt,
        )  # fmt: skip
        for c in r.choices:
            assert c.finish_reason == "stop", (seed, c.index, c.message.content)
            value = json.loads(c.message.content)
            jsonschema.validate(value, PERSON)
            seen.add(c.message.content)
    assert len(seen) > len(SEEDS) // 2  # sampled, not one answer repeated
    # control: the same seeds without the format write no JSON
    for seed in SEEDS[:5]:
        r = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=40, temperature=1.0, seed=seed
        )
        with pytest.raises(json.JSONDecodeError):
            json.loads(r.choices[0].message.content)


def test_json_schema_streams_the_same_text_on_completions(client):
    kw = {
        "model": MODEL, "prompt": "Errors should", "max_tokens": 120, "temperature": 1.0,
        "seed": 5, "extra_body": {"response_format": _schema_format(PERSON)},
    }  # fmt: skip
    full = client.completions.create(**kw).choices[0]
    jsonschema.validate(json.loads(full.text), PERSON)
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == full.text


def test_json_object_parses_to_an_object(client):
    """Any JSON object; a bias toward '}' lets the tiny model close it within max_tokens."""
    tok = Tokenizer.from_folder(ZEN_DIR)
    assert tok is not None
    close = tok.backend.token_to_id("}")
    assert close is not None
    stopped = 0
    for seed in range(8):
        r = client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=150, temperature=1.0, seed=seed,
            response_format={"type": "json_object"}, logit_bias={str(close): 8},
        )  # fmt: skip
        c = r.choices[0]
        if c.finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(c.message.content), dict)
        else:
            assert c.message.content.startswith("{")
    assert stopped >= 4


def test_guided_choice_and_regex(client):
    choices = ["yes", "no way", "maybe"]
    got: set[str] = set()
    for seed in range(12):
        r = client.completions.create(
            model=MODEL, prompt="Errors", max_tokens=20, temperature=1.0, seed=seed,
            extra_body={"guided_choice": choices},
        )  # fmt: skip
        assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
        got.add(r.choices[0].text)
    plain = client.completions.create(model=MODEL, prompt="Errors", max_tokens=20, seed=0)
    assert plain.choices[0].text not in choices  # control: the choice came from the grammar
    pattern = "[0-9]{3}-[a-z]{2,5}"
    for seed in range(6):
        r = client.completions.create(
            model=MODEL, prompt="Errors", max_tokens=20, temperature=1.0, seed=seed,
            extra_body={"guided_regex": pattern},
        )  # fmt: skip
        assert re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
        assert r.choices[0].finish_reason == "stop"


BAD = [
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema"),
    ({"response_format": _schema_format({"type": "nope"})}, "response_format.json_schema"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format.extra"),
    ({"guided_regex": "(a|b"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_formats_get_a_400_naming_the_field(zen_server, fields, param):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, **fields}
    r = httpx.post(f"{zen_server.url}/v1/chat/completions", content=json.dumps(body))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
