"""Structured output: a grammar's token mask applied in the sampler, through llguidance.

The server's `response_format` (`json_object`, `json_schema`) and vLLM's `guided_regex` and
`guided_choice` each become an llguidance grammar (`grammar_for_*`); every choice of a request
gets its own `GrammarConstraint` (runtime/sampling.py's TokenConstraint) over it. Each step the
constraint computes llguidance's bitmask of the tokens the grammar allows next and sets the
others' logits to -inf, so the sampler can only draw text the grammar accepts; once the grammar is
complete only EOS is allowed and the sequence ends.

llguidance is a Rust library with a numpy interface (no torch): it reads the artifact's
tokenizer.json as is. JSON is generated compact (no free whitespace), as llguidance's
`whitespace_flexible=False`, so the model cannot spend its tokens on blanks.

Letters in names: V vocab, W 32-bit mask words (V / 32 rounded up).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from kiln.errors import KilnError, RequestError
from kiln.runtime.tokenizer import Tokenizer


def grammar_for_json_schema(schema: dict[str, Any] | None) -> str:
    """The grammar of JSON text valid under `schema` (None: any JSON object, `json_object`)."""
    schema = {"type": "object"} if schema is None else schema
    compact = llguidance.LLMatcher.grammar_from_json_schema(
        schema, overrides={"whitespace_flexible": False}
    )
    return str(compact)


def grammar_for_regex(pattern: str) -> str:
    """The grammar of text matching the (Rust-syntax) regular expression, whole."""
    return str(llguidance.LLMatcher.grammar_from_regex(pattern))


def grammar_for_choice(choices: list[str]) -> str:
    """The grammar of exactly one of `choices` (JSON string literals are Lark literals)."""
    alternatives = " | ".join(json.dumps(c) for c in choices)
    return str(llguidance.LLMatcher.grammar_from_lark(f"start: {alternatives}"))


@dataclass
class Grammars:
    """The served tokenizer as llguidance sees it, built once at first use (~0.1-1 s)."""

    tokenizer: Tokenizer
    vocab: int
    eos_ids: tuple[int, ...]
    _ll: llguidance.LLTokenizer | None = field(init=False, default=None)

    @property
    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The view llguidance has of tokenizer.json, over the graph's vocab (logit rows)."""
        if self._ll is None:
            self._ll = llguidance.LLTokenizer(
                self.tokenizer.backend.to_str(), n_vocab=self.vocab, eos_token=list(self.eos_ids)
            )
        return self._ll

    def check(self, grammar: str, param: str) -> None:
        """Raise a RequestError naming `param` when llguidance refuses the grammar."""
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self.ll_tokenizer
        )
        if failed:
            why = messages[0].strip().splitlines()[0] if messages else "invalid grammar"
            raise RequestError(
                f"Field '{param}' cannot be compiled to a grammar ({why}); fix it and retry.",
                param=param,
                code="invalid_value",
            )

    def constraint(self, grammar: str) -> GrammarConstraint:
        """A fresh constraint (its own parser state) for one sequence."""
        matcher = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise KilnError(f"llguidance refused a checked grammar: {matcher.get_error()}")
        return GrammarConstraint(matcher, self.vocab)


class GrammarConstraint:
    """One sequence's grammar state: the mask of allowed next tokens, advanced per token."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self.matcher = matcher
        self.vocab = vocab
        self._mask_1W = allocate_token_bitmask(1, vocab)

    def allowed(self) -> np.ndarray:
        """A bool per token: may it come next."""
        fill_next_token_bitmask(self.matcher, self._mask_1W)
        bits = np.unpackbits(self._mask_1W.view(np.uint8), bitorder="little")
        return bits[: self.vocab].astype(bool)

    def mask(self, logits_V: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar forbids next set to -inf."""
        return np.where(self.allowed(), logits_V, np.float32(-np.inf)).astype(logits_V.dtype)

    def accept(self, token_id: int) -> bool:
        """Advance over the chosen token; True once the grammar is complete."""
        if not self.matcher.consume_token(token_id):
            raise KilnError(
                f"Token {token_id} broke the grammar ({self.matcher.get_error()}); the mask "
                "should have made it impossible: this is a bug in kiln."
            )
        return bool(self.matcher.is_stopped())


def grammars_for(
    tokenizer: Tokenizer | None, vocab: int, eos_ids: tuple[int, ...]
) -> Grammars | None:
    """The served model's Grammars, or None when it carries no tokenizer (ids in, ids out)."""
    return None if tokenizer is None else Grammars(tokenizer, vocab, eos_ids)
