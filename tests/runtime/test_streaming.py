"""Streaming: pieces never split a character, join to tokenizer.decode, and honour stop strings."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from kiln.models.zen import ZEN_DIR, ZEN_PROMPT, zen_text
from kiln.runtime import load
from kiln.runtime.detokenize import IncrementalDetokenizer, StopStrings

MULTIBYTE = "Beautiful ☃ is better than 日本語, 🎉🐍 naïve façade — “quoted” Ωμέγα."


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(ZEN_DIR)


def test_multibyte_pieces_are_whole_characters(tok):
    ids = tok(MULTIBYTE, add_special_tokens=False)["input_ids"]
    naive = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in naive)  # control: byte-level tokens do split characters
    d = IncrementalDetokenizer(tok)
    pieces = [d.push(i) for i in ids]
    pieces.append(d.finish())
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == MULTIBYTE
    assert sum(1 for p in pieces if p) > 10  # it streams, not one piece at the end


def test_dangling_half_character_matches_decode(tok):
    ids = tok("日本", add_special_tokens=False)["input_ids"][:-1]  # cut inside the last character
    d = IncrementalDetokenizer(tok)
    joined = "".join(d.push(i) for i in ids) + d.finish()
    assert joined == tok.decode(ids)


def test_stop_strings_hold_back_and_cut():
    s = StopStrings(("\nSimple", "XYZ"))
    out = []
    for piece in ["ugly.", "\nSim", "p", "le is", " better"]:
        text, hit = s.feed(piece)
        out.append(text)
        if hit:
            break
    assert out == ["ugly.", "", "", ""]
    assert hit
    s2 = StopStrings(("\nSimple",))
    assert s2.feed("a\nSim") == ("a", False)
    assert s2.feed("ilar") == ("\nSimilar", False)  # a false start is released


@pytest.fixture(scope="module")
def zen(exported):
    return load(exported("zen"))


def test_stream_joins_to_decode_of_output(zen, tok):
    events = list(zen.stream(ZEN_PROMPT, max_new_tokens=80))
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == tok.decode(ids, skip_special_tokens=True)
    assert events[-1].finish_reason == "length" and all(
        e.finish_reason is None for e in events[:-1]
    )
    assert zen_text().startswith(ZEN_PROMPT + "".join(e.text for e in events))


def test_stream_of_sampled_bytes_never_breaks_utf8(zen, tok):
    """A prompt of multi-byte text and hot sampling produce stray bytes; pieces stay valid."""
    for seed in range(3):
        events = list(
            zen.stream(MULTIBYTE, max_new_tokens=40, temperature=3.0, seed=seed, ignore_eos=True)
        )
        ids = [e.token_id for e in events]
        assert "".join(e.text for e in events) == tok.decode(ids, skip_special_tokens=True)
        for e in events:
            e.text.encode("utf-8")  # a lone surrogate would raise here


def test_stop_string_ends_generation(zen):
    full = zen.generate(ZEN_PROMPT, max_new_tokens=60)
    cut = zen.generate(ZEN_PROMPT, max_new_tokens=60, stop=["\nSimple"])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index("\nSimple")]
    assert len(cut.token_ids) < len(full.token_ids)
    streamed = "".join(e.text for e in zen.stream(ZEN_PROMPT, max_new_tokens=60, stop="\nSimple"))
    assert streamed == cut.text


def test_batch_stream_interleaves_rows(zen):
    prompts = [ZEN_PROMPT, "Flat is", "Now is better"]
    events = list(zen.stream(prompts, max_new_tokens=20))
    done = zen.generate(prompts, max_new_tokens=20)
    for c in done:
        assert "".join(e.text for e in events if e.index == c.index) == c.text
        assert [e.token_id for e in events if e.index == c.index] == c.token_ids
