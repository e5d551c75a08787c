"""The bundled model writes the Zen of Python through the runtime: fp32, fp16, optimized fp16."""

from __future__ import annotations

import pytest

from kiln.models.zen import ZEN_PROMPT, zen_text
from kiln.runtime import load


@pytest.fixture(scope="module")
def optimized_fp16(exported, tmp_path_factory):
    from kiln.optimize import optimize_model

    out = tmp_path_factory.mktemp("rt-opt-zen") / "optimized"
    # check_torch off: the bundled model is judged by its text below, not by logits
    return optimize_model(exported("zen"), out, precision="fp16", check_torch=False)


@pytest.mark.parametrize("which", ["fp32", "fp16", "optimized-fp16"])
def test_zen_text(which, exported, optimized_fp16):
    artifact = optimized_fp16 if which == "optimized-fp16" else exported("zen", which)
    gen = load(artifact)
    done = gen.generate(ZEN_PROMPT, max_new_tokens=400)
    assert done.finish_reason == "stop"  # ends on its own EOS, not the limit
    assert ZEN_PROMPT + done.text == zen_text()
    streamed = "".join(e.text for e in gen.stream(ZEN_PROMPT, max_new_tokens=400))
    assert streamed == done.text


def test_ragged_batch_of_zen_lines(exported):
    """Prompts cut from the text continue it, each row alone or batched."""
    gen = load(exported("zen"))
    text = zen_text()
    prompts = [ZEN_PROMPT, text[: text.index("Flat is") + 7], text[: text.index("Now is") + 6]]
    batched = gen.generate(prompts, max_new_tokens=24, ignore_eos=True)
    for p, c in zip(prompts, batched, strict=True):
        alone = gen.generate(p, max_new_tokens=24, ignore_eos=True)
        assert c.token_ids == alone.token_ids
        assert text.startswith(p + c.text)
