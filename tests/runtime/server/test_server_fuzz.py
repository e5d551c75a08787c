"""Fuzzing the live single-process server over the bundled model with tests/api_fuzz.py: no
OpenAI-shaped body gets a 5xx, and the connection survives it.

Examples per test: KILN_FUZZ_EXAMPLES, default 100 (300 bodies over the three fuzz tests, ~6 s
of requests on 2 cores besides the server's start); the long local run is
`KILN_FUZZ_EXAMPLES=7000` (21,000 bodies, ~10 min).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from api_fuzz import KINDS, Fuzzer, fuzz, fuzz_settings

FUZZ = fuzz_settings("KILN_FUZZ_EXAMPLES", 100)


@pytest.fixture(scope="module")
def fuzzer(zen_server) -> Iterator[Fuzzer]:
    f = Fuzzer(zen_server.url)
    yield f
    f.client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_bodies(fuzzer, kind):
    fuzz(fuzzer, kind, FUZZ)


def test_negative_seed_is_its_twos_complement(fuzzer):
    """The crash that started this test: seed -1 answered 500. It is 2**64 - 1 as a 64-bit word;
    past 64 bits it is refused naming the range."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1}
    texts = []
    for seed in (-1, 2**64 - 1, 5):
        r = fuzzer.post("chat", json.dumps({**chat, "seed": seed}).encode())
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["token_ids"])
    assert texts[0] == texts[1] != texts[2]
    for seed in (2**64, -(2**63) - 1):
        r = fuzzer.post("chat", json.dumps({**chat, "seed": seed}).encode())
        assert r.status_code == 400
        assert r.json()["error"]["param"] == "seed"
        assert "from -2**63 to 2**64 - 1" in r.json()["error"]["message"]
