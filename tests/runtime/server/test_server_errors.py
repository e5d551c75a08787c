"""Bad input gets a 4xx in the OpenAI error shape that says what to change; serving goes on."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx2 as httpx
import openai
import pytest

LONG = "Beautiful is better than ugly. " * 80  # ~480 tokens > the 384-token slots

# (case, endpoint, raw body, status, param, words the message must hold)
CASES = [
    ("malformed JSON", "completions", b'{"prompt": "a",}', 400, None, "not valid JSON"),
    ("invalid UTF-8", "completions", b'{"prompt": "\xff\xfe"}', 400, None, "not valid UTF-8"),
    ("not an object", "completions", b'["a"]', 400, None, "not an object"),
    ("empty body", "completions", b"", 400, None, "body is empty"),
    ("missing prompt", "completions", {"max_tokens": 3}, 400, "prompt", "is required"),
    ("max_tokens type", "completions", {"prompt": "a", "max_tokens": "ten"}, 400, "max_tokens",
     "valid integer"),
    ("max_tokens as string number", "completions", {"prompt": "a", "max_tokens": "5"}, 400,
     "max_tokens", "valid integer"),
    ("temperature type", "completions", {"prompt": "a", "temperature": "hot"}, 400,
     "temperature", "valid number"),
    ("stream type", "completions", {"prompt": "a", "stream": "yes"}, 400, "stream",
     "valid boolean"),
    ("negative max_tokens", "completions", {"prompt": "a", "max_tokens": -5}, 400, "max_tokens",
     "must be between 1 and"),
    ("huge max_tokens", "completions", {"prompt": "a", "max_tokens": 10**9}, 400, "max_tokens",
     "ask for fewer tokens"),
    ("prompt past the context", "completions", {"prompt": LONG}, 400, "prompt",
     "shorten the prompt to at most 383 tokens"),
    ("token id past the vocab", "completions", {"prompt": [1, 999]}, 400, "prompt",
     "send ids below 384"),
    ("unknown model", "completions", {"prompt": "a", "model": "gpt-4o"}, 404, "model",
     "serves 'zen-llama'"),
    ("n = 0", "completions", {"prompt": "a", "n": 0}, 400, "n", "greater than or equal to 1"),
    ("two prompts", "completions", {"prompt": ["a", "b"]}, 400, "prompt", "separate"),
    ("top_p out of range", "completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p",
     "less than or equal to 1"),
    ("unsupported best_of", "completions", {"prompt": "a", "best_of": 5}, 400, "best_of",
     "not supported"),
    ("five stop strings", "completions", {"prompt": "a", "stop": list("abcde")}, 400, "stop",
     "up to 4"),
    ("chat without messages", "chat/completions", {"messages": []}, 400, "messages",
     "at least 1 item"),
    ("chat message type", "chat/completions", {"messages": [{"role": "user", "content": 5}]},
     400, "messages.0.content", "valid string"),
    ("response_format type", "chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "response_format": {"type": "yaml"}},
     400, "response_format.type", "'json_object' or 'json_schema'"),
    ("tools", "chat/completions",
     {"messages": [{"role": "user", "content": "a"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported"),
    ("tool_choice", "chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "tool_choice": "auto"}, 400, "tool_choice",
     "not supported"),
    ("store true", "chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "store": True}, 400, "store",
     "not supported"),
    ("unknown field", "completions", {"prompt": "a", "beam_width": 4}, 400, "beam_width",
     "'beam_width' is not a field this server implements"),
    ("chat field on completions", "completions", {"prompt": "a", "max_completion_tokens": 4},
     400, "max_completion_tokens", "not a field this server implements"),
    ("chat past the context", "chat/completions",
     {"messages": [{"role": "user", "content": LONG}]}, 400, "prompt", "shorten the prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "endpoint", "body", "status", "param", "words"), CASES,
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_bad_request_gets_a_clear_4xx(zen_server, case, endpoint, body, status, param, words):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{zen_server.url}/v1/{endpoint}", content=raw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] in ("invalid_request_error",)
    assert error["param"] == param
    assert words in error["message"], error["message"]


def test_server_keeps_serving_after_bad_requests(zen_server):
    for _, endpoint, body, *_ in CASES:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(f"{zen_server.url}/v1/{endpoint}", content=raw)
    ok = httpx.post(f"{zen_server.url}/v1/completions", json={"prompt": "a", "max_tokens": 2})
    assert ok.status_code == 200
    assert ok.json()["usage"]["completion_tokens"] == 2


def test_openai_client_raises_the_message(zen_server):
    client = openai.OpenAI(base_url=f"{zen_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="less than or equal to 16"):
        client.completions.create(model="zen-llama", prompt="a", n=17)
    with pytest.raises(openai.NotFoundError, match="serves 'zen-llama'"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])


def test_openai_client_gets_a_400_naming_an_unimplemented_field(zen_server):
    """A feature the server does not implement is refused, not answered 200 and ignored."""
    client = openai.OpenAI(base_url=f"{zen_server.url}/v1", api_key="x", max_retries=0)
    chat = [{"role": "user", "content": "a"}]
    with pytest.raises(openai.BadRequestError, match="'tool_choice'") as e:
        client.chat.completions.create(model="zen-llama", messages=chat, tool_choice="auto")
    assert e.value.param == "tool_choice" and e.value.code == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError, match="'reasoning_effort'") as e:
        client.chat.completions.create(model="zen-llama", messages=chat, reasoning_effort="low")
    assert e.value.param == "reasoning_effort"
    with pytest.raises(openai.BadRequestError, match="'echo'"):
        client.completions.create(model="zen-llama", prompt="a", echo=True)


def test_harmless_metadata_and_neutral_values_are_accepted(zen_server):
    """user / metadata, store=false, service_tier auto and features at their neutral value."""
    client = openai.OpenAI(base_url=f"{zen_server.url}/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model="zen-llama",
        messages=[{"role": "user", "content": "a"}],
        max_tokens=2,
        user="u-1",
        metadata={"run": "test"},
        store=False,
        service_tier="auto",
        response_format={"type": "text"},
        logprobs=False,
        tool_choice="none",
    )
    assert r.usage.completion_tokens == 2


def test_unknown_route_in_error_shape(zen_server):
    r = httpx.get(f"{zen_server.url}/v1/engines")
    assert r.status_code == 404
    assert "/v1/completions" in r.json()["error"]["message"]


def test_serve_refuses_a_concat_artifact(exported, capsys):
    from kiln.cli import main

    assert main(["serve", str(exported("llama", "fp32"))]) == 1
    assert "--kv static" in capsys.readouterr().err


def test_help_imports_no_server_or_model_library():
    code = (
        "import sys; from kiln.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('fastapi', 'uvicorn', 'torch', 'onnxruntime', 'openai') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_exits_when_the_model_fails_to_load(tiny_static, tmp_path, capsys):
    import shutil

    from kiln.cli import main
    from kiln.runtime.server.serve import free_port

    broken = tmp_path / "broken"
    shutil.copytree(tiny_static, broken)
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    assert main(["serve", str(broken), "--port", str(free_port())]) == 1
    assert "loading the artifact failed" in capsys.readouterr().err
