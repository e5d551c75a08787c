"""Incremental detokenization: text pieces that never split a UTF-8 character, and stop strings.

Byte-level tokenizers split one character over several tokens, so decoding one token at a time
emits U+FFFD halves. `IncrementalDetokenizer` decodes a short window of recent tokens and holds
text back while it ends in U+FFFD (the offsets scheme of text-generation-inference's
`decode_token`); `finish` emits whatever the whole-output decode has beyond what was streamed,
so the joined pieces equal `tokenizer.decode(all_ids)`.
"""

from __future__ import annotations

import logging

from kiln.runtime.tokenizer import Decoder

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turn a growing list of token ids into text pieces, one call per new token."""

    def __init__(self, tokenizer: Decoder, *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = 0  # start of the context window (tokens already emitted as text)
        self._read = 0  # end of the tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        text: str = self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
        return text

    def push(self, token_id: int) -> str:
        """Add one token; return the new complete text ('' while a character is unfinished)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            piece = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.emitted += piece
            return piece
        return ""

    def finish(self) -> str:
        """The rest of the whole-output decode (a trailing half character becomes U+FFFD)."""
        full = self._decode(self.ids)
        if not full.startswith(self.emitted):
            # Cannot happen for byte-level BPE; tokenizers that rewrite text across windows
            # (clean_up_tokenization_spaces) could; the stream then keeps what it sent.
            log.warning("streamed text diverged from the whole decode; keeping the streamed text")
            return ""
        rest = full[len(self.emitted) :]
        self.emitted = full
        return rest


class StopStrings:
    """Hold back text that could begin a stop string; cut the text where one appears."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Return (text safe to emit, True when a stop string was hit)."""
        if not self.stops:
            return piece, False
        buf = self.pending + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[: min(hits)], True
        hold = max((_overlap(buf, s) for s in self.stops), default=0)
        self.pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release held-back text at the end of a sequence that did not stop on a string."""
        out, self.pending = self.pending, ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
