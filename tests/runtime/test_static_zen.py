"""The bundled model writes the Zen of Python through its static-KV export, over slots."""

from __future__ import annotations

from kiln.models.zen import ZEN_PROMPT, zen_text
from kiln.runtime import load


def test_zen_text_through_static_slots(exported):
    gen = load(exported("zen", "fp32", kv="static"), slots=2)
    assert type(gen.backend).__name__ == "OrtSlotBackend"
    done = gen.generate(ZEN_PROMPT, max_new_tokens=400)
    assert done.finish_reason == "stop"  # its own EOS, not the limit
    assert ZEN_PROMPT + done.text == zen_text()
    streamed = "".join(e.text for e in gen.stream(ZEN_PROMPT, max_new_tokens=400))
    assert streamed == done.text


def test_zen_text_through_static_fp16(exported):
    """An fp16 static export: fp16 buffers and fp16 logits, handed back as float32."""
    gen = load(exported("zen", "fp16", kv="static"), slots=2)
    assert gen.backend.logits_dtype.__name__ == "float16"
    done = gen.generate(ZEN_PROMPT, max_new_tokens=400)
    assert ZEN_PROMPT + done.text == zen_text()


def test_zen_lines_share_slots(exported):
    """Three prompts cut from the text, over 2 slots: each continues the text as alone."""
    gen = load(exported("zen", "fp32", kv="static"), slots=2)
    text = zen_text()
    prompts = [ZEN_PROMPT, text[: text.index("Flat is") + 7], text[: text.index("Now is") + 6]]
    batched = gen.generate(prompts, max_new_tokens=24, ignore_eos=True)
    for p, c in zip(prompts, batched, strict=True):
        assert text.startswith(p + c.text)


def test_kiln_generate_on_a_static_artifact(exported, capsys):
    from kiln.cli import main

    art = str(exported("zen", "fp32", kv="static"))
    assert main(["generate", art, "--prompt", ZEN_PROMPT, "--max-new-tokens", "40"]) == 0
    out = capsys.readouterr().out
    assert zen_text().startswith(out.rstrip("\n")) and len(out) > len(ZEN_PROMPT) + 40
