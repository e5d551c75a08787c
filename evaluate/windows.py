"""The sliding-window plan of strided perplexity (as Hugging Face's perplexity guide computes it).

Windows of `window` tokens start every `stride` tokens; each scores only the tokens no earlier
window scored, so every token after the first is scored exactly once, with at least
`window - stride` tokens of context (all before it in the first window). The first token has
no prediction: a text of N tokens scores N - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; the last `scored` of them are predicted and scored."""

    begin: int
    end: int
    scored: int

    @property
    def first_target(self) -> int:
        """Index (in the text) of the first scored token."""
        return self.end - self.scored


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows over `n_tokens` tokens; their `scored` sum to n_tokens - 1."""
    if window < 2 or not 1 <= stride <= window:
        raise ConfigError(
            f"window {window} and stride {stride}: need window >= 2 and 1 <= stride <= window; "
            "e.g. --window 256 --stride 128."
        )
    if n_tokens < 2:
        raise ConfigError(
            f"the text has {n_tokens} token(s); perplexity needs at least 2: pass a longer --text."
        )
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        # The first window cannot score its first token: nothing predicts it.
        scored = end - max(prev_end, 1)
        out.append(Window(begin, end, scored))
        prev_end = end
        if end == n_tokens:
            break
    return out
