"""The bundled model's training text and where the model lives.

Every stage (ONNX export, fp16, TensorRT engine) checks its output against one fact: greedy
decoding from `ZEN_PROMPT` must still reproduce `zen_text()` exactly and then stop at EOS.
This module is stdlib only, so tests and the CLI can import it without torch.
"""

from __future__ import annotations

import codecs
import contextlib
import io
from pathlib import Path

ZEN_DIR: Path = Path(__file__).parent / "zen-llama"
"""The trained model folder (config, weights, tokenizer), made by `make tiny-model`."""

ZEN_PROMPT: str = "Beautiful is better than"
"""The first words of `zen_text()`; the model continues them to the end of the text."""

_TITLE = "The Zen of Python, by Tim Peters\n\n"


def zen_text() -> str:
    """Return the Zen of Python, without its title line, exactly as the model was trained on it.

    The text comes from the stdlib `this` module (stored rot13-encoded in `this.s`), so it needs
    no data file. Importing `this` prints the text, which we swallow.
    """
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    text = codecs.decode(this.s, "rot13")
    # The title says nothing about the model; starting at the first aphorism keeps the prompt short.
    return text.removeprefix(_TITLE)
