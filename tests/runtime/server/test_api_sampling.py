"""logprobs, presence/frequency penalties, logit_bias, n, seed per choice and stop_token_ids
through the official openai client, checked against ONNX Runtime's logits of the same tokens.

The reference runs the concat export of the bundled model in an ONNX Runtime session over the
whole sequence (prompt + the server's tokens) in one call: row t of its logits is the model's
distribution of token t + 1. The server runs the static-KV export over slots, so values agree
to float32 rounding of two graphs (tolerance 2e-3 in logprob), not bit for bit.
"""

from __future__ import annotations

import json

import httpx2 as httpx
import numpy as np
import onnxruntime as ort
import pytest
from openai import OpenAI

from kiln.graph_io import ConcatStepper
from kiln.models.zen import ZEN_DIR, ZEN_PROMPT
from kiln.runtime.tokenizer import Tokenizer

LOGPROB_TOL = 2e-3
MODEL = "zen-llama"


@pytest.fixture(scope="module")
def client(zen_server) -> OpenAI:
    return OpenAI(base_url=f"{zen_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.from_folder(ZEN_DIR)
    assert t is not None
    return t


@pytest.fixture(scope="module")
def log_softmax(exported):
    """ids -> [len(ids), V] float64 log-softmax of ONNX Runtime's logits (concat export)."""
    session = ort.InferenceSession(
        str(exported("zen", "fp32") / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    stepper = ConcatStepper(session)

    def run(ids: list[int]) -> np.ndarray:
        n = len(ids)
        logits, _ = stepper.run(
            np.array([ids], np.int64),
            np.ones((1, n), np.int64),
            np.arange(n, dtype=np.int64)[None],
            stepper.empty_past(1),
        )
        x = np.asarray(logits[0], np.float64)
        top = x.max(axis=-1, keepdims=True)
        return x - top - np.log(np.exp(x - top).sum(axis=-1, keepdims=True))

    return run


def _reference_rows(log_softmax, prompt: list[int], out: list[int]) -> np.ndarray:
    """The reference distribution of each generated token: rows len(prompt)-1 ... end-1."""
    return log_softmax(prompt + out)[len(prompt) - 1 : len(prompt) - 1 + len(out)]


def test_completion_logprobs_equal_onnxruntime(client, tok, log_softmax):
    prompt = tok.encode("Errors should")
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, seed=3, logprobs=5
    )
    c = r.choices[0]
    out = c.model_extra["token_ids"]
    ref = _reference_rows(log_softmax, prompt, out)
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(out) == len(lp.tokens) == len(lp.top_logprobs)
    want = [ref[i, t] for i, t in enumerate(out)]
    np.testing.assert_allclose(lp.token_logprobs, want, atol=LOGPROB_TOL, rtol=0)
    for i, top in enumerate(lp.top_logprobs):
        ids = np.argsort(-ref[i], kind="stable")[:5]
        assert list(top.values()) == pytest.approx(ref[i, ids].tolist(), abs=LOGPROB_TOL)
        assert list(top) == [tok.decode([int(t)]) for t in ids]
    assert lp.tokens == [tok.decode([t]) for t in out]
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(out))]
    # control: the distribution one position off does not match
    shifted = [ref[i - 1, t] for i, t in enumerate(out) if i]
    assert np.abs(np.array(lp.token_logprobs[1:]) - shifted).max() > 0.1
    # the stream carries the same values, one token per chunk
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, seed=3, logprobs=5,
            stream=True,
        )
    )  # fmt: skip
    streamed = [x for ch in chunks for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert [x for ch in chunks for x in ch.choices[0].logprobs.text_offset] == lp.text_offset


def test_chat_logprobs_equal_onnxruntime(client, tok, log_softmax):
    messages = [{"role": "user", "content": "Beautiful is better than"}]
    kw = {"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0}
    r = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    out = c.model_extra["token_ids"]
    ref = _reference_rows(log_softmax, prompt, out)
    content = c.logprobs.content
    assert [e.logprob for e in content] == pytest.approx(
        [ref[i, t] for i, t in enumerate(out)], abs=LOGPROB_TOL
    )
    for i, e in enumerate(content):
        assert e.token == tok.decode([out[i]]) and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the top one
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(
            np.sort(ref[i])[::-1][:3].tolist(), abs=LOGPROB_TOL
        )
    chunks = list(client.chat.completions.create(**kw, logprobs=True, top_logprobs=3, stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]  # fmt: skip
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    plain = client.chat.completions.create(**kw)
    assert plain.choices[0].logprobs is None  # control: none unless asked
    assert plain.choices[0].message.content == c.message.content


def _penalized(ref_row: np.ndarray, out: list[int], freq: float, pres: float, bias: dict):
    """The row adjusted by OpenAI's definition, in float64."""
    x = ref_row.copy()
    for t, b in bias.items():
        x[t] += b
    for t in set(out):
        x[t] -= out.count(t) * freq + pres
    return x


@pytest.mark.parametrize(
    ("freq", "pres", "bias"),
    [(2.0, 0.0, {}), (2.0, 2.0, {}), (1.5, 0.5, {}), (0.0, 0.0, "ban-first")],
)
def test_penalties_and_bias_follow_the_definition(client, tok, log_softmax, freq, pres, bias):
    """Greedy under penalties: each token is the argmax of the reference's adjusted logits.

    Log-softmax differs from the logits by a per-row constant, which no argmax sees.
    """
    prompt = tok.encode(ZEN_PROMPT)
    kw = {"model": MODEL, "prompt": prompt, "max_tokens": 80, "temperature": 0}
    plain = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    if bias == "ban-first":
        bias = {plain[0]: -100.0, plain[3]: -100.0}
    r = client.completions.create(
        **kw,
        frequency_penalty=freq,
        presence_penalty=pres,
        logit_bias={str(t): b for t, b in bias.items()},
    )
    out = r.choices[0].model_extra["token_ids"]
    ref = log_softmax(prompt + out)
    checked = 0
    for i, t in enumerate(out):
        x = _penalized(ref[len(prompt) - 1 + i], out[:i], freq, pres, bias)
        second, first = np.sort(x)[-2:]
        if first - second < 1e-3:
            continue  # a near tie: two graphs may round it either way
        assert t == int(np.argmax(x)), i
        checked += 1
    assert checked >= len(out) - 2
    assert out != plain  # control: the adjustment changed the text


def test_n_choices_each_equal_a_single_request_with_seed_plus_i(client):
    kw = {"model": MODEL, "prompt": "Errors should", "max_tokens": 12, "temperature": 1.0}
    r = client.completions.create(**kw, n=3, seed=11)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    singles = [client.completions.create(**kw, seed=11 + i).choices[0].text for i in range(3)]
    assert texts == singles
    assert len(set(texts)) == 3  # control: the choices differ
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in r.choices)
    chunks = list(
        client.completions.create(
            **kw, n=3, seed=11, stream=True, stream_options={"include_usage": True}
        )
    )
    by_index = ["", "", ""]
    for ch in chunks[:-1]:
        by_index[ch.choices[0].index] += ch.choices[0].text
    assert by_index == texts
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        r.usage.completion_tokens
    )
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6, n=2, seed=1,
        temperature=1.0,
    )  # fmt: skip
    assert [c.index for c in chat.choices] == [0, 1]
    assert all(c.message.role == "assistant" for c in chat.choices)


def test_stop_token_ids_end_the_choice(client, tok):
    kw = {"model": MODEL, "prompt": ZEN_PROMPT, "max_tokens": 30, "temperature": 0}
    plain = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    stop = plain[5]
    r = client.completions.create(**kw, extra_body={"stop_token_ids": [stop]})
    c = r.choices[0]
    assert c.model_extra["token_ids"] == plain[: plain.index(stop) + 1]
    assert c.finish_reason == "stop"


BAD = [
    ("completions", {"presence_penalty": 2.5}, "presence_penalty"),
    ("completions", {"frequency_penalty": -3}, "frequency_penalty"),
    ("completions", {"logit_bias": {"abc": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"384": 1}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("completions", {"logit_bias": {"5": "x"}}, "logit_bias.5"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"logprobs": True}, "logprobs"),
    ("completions", {"n": 0}, "n"),
    ("completions", {"n": 17}, "n"),
    ("completions", {"stop_token_ids": [384]}, "stop_token_ids"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"logprobs": 3}, "logprobs"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), BAD)
def test_bad_values_get_a_400_naming_the_field(zen_server, endpoint, fields, param):
    body = {"model": MODEL, "max_tokens": 2, **fields}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": "a"}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = "a"
        path = "/v1/completions"
    r = httpx.post(zen_server.url + path, content=json.dumps(body))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split(".")[0] in error["message"]
    body = {k: v for k, v in body.items() if k not in fields}  # control: fine without them
    assert httpx.post(zen_server.url + path, content=json.dumps(body)).status_code == 200
