"""From a validated request to what the scheduler runs: prompt token ids and SamplingParams.

Every check that depends on the loaded model lives here (model name, chat template, token ids
within the vocabulary, prompt plus max_tokens within the slot context), each raising a
RequestError whose message names the field, the offending value and the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from kiln.errors import ConfigError, RequestError
from kiln.runtime.sampling import SamplingParams
from kiln.runtime.server.schemas import ChatRequest, CompletionRequest, SamplingFields
from kiln.runtime.structured import (
    Grammars,
    grammar_for_choice,
    grammar_for_json_schema,
    grammar_for_regex,
)
from kiln.runtime.tokenizer import Tokenizer

MAX_STOP_STRINGS = 4  # as the OpenAI API


@dataclass(frozen=True)
class ModelView:
    """What request checks need to know about the served model."""

    name: str
    max_context: int
    vocab: int
    eos_ids: tuple[int, ...]
    tokenizer: Tokenizer | None  # None when the artifact carries no tokenizer files
    grammars: Grammars | None = None  # structured output; None without a tokenizer


@dataclass(frozen=True)
class Prepared:
    """A request ready for the scheduler."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1  # choices, each its own Sequence with SamplingParams.for_choice(i)
    grammar: str | None = None  # a checked llguidance grammar each choice is constrained by


def prepare_completion(req: CompletionRequest, model: ModelView) -> Prepared:
    """Prompt ids of a completion request (text or ids, one prompt) and its sampling params."""
    _check_common(req, model)
    prompt: Any = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise RequestError(
                f"Field 'prompt' holds {len(prompt)} prompts; this server runs one prompt per "
                "request: send them as separate (concurrent) requests.",
                param="prompt",
            )
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = _encode(prompt, model)
    else:
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < model.vocab]
        if bad:
            raise RequestError(
                f"Field 'prompt' holds token id {bad[0]}, outside this model's vocabulary "
                f"[0, {model.vocab}); send ids below {model.vocab}.",
                param="prompt",
            )
    return _prepared(req, ids, ("max_tokens", req.max_tokens), model, req.logprobs)


def prepare_chat(req: ChatRequest, model: ModelView) -> Prepared:
    """Prompt ids of a conversation (the tokenizer's chat template) and its sampling params."""
    _check_common(req, model)
    tok = model.tokenizer
    if tok is None or not tok.chat_template:
        raise RequestError(
            f"Model '{model.name}' has no chat template (chat_template.jinja or "
            "tokenizer_config.json); use POST /v1/completions with a plain prompt instead.",
            param="messages",
            code="no_chat_template",
        )
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        ids = tok.encode_chat(messages, add_generation_prompt=True)
    except TemplateError as e:  # the template's raise_exception: e.g. roles must alternate
        raise RequestError(
            f"The chat template of model '{model.name}' refuses these messages: {e}; change the "
            "conversation to the form the template accepts.",
            param="messages",
        ) from None
    length: tuple[str, int | None] = ("max_tokens", req.max_tokens)
    if req.max_tokens is None and req.max_completion_tokens is not None:
        length = ("max_completion_tokens", req.max_completion_tokens)
    if req.top_logprobs and not req.logprobs:
        raise RequestError(
            f"Field 'top_logprobs' = {req.top_logprobs} needs 'logprobs': true; set both.",
            param="top_logprobs",
        )
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return _prepared(req, ids, length, model, logprobs)


def _check_common(req: SamplingFields, model: ModelView) -> None:
    if req.model is not None and req.model != model.name:
        raise RequestError(
            f"Model '{req.model}' is not served here; this server serves '{model.name}' "
            "(GET /v1/models lists it): set 'model' to that name.",
            status=404,
            param="model",
            code="model_not_found",
        )
    for field, ids in (
        ("stop_token_ids", req.stop_token_ids or []),
        ("logit_bias", _bias_ids(req)),
    ):
        bad = [t for t in ids if not 0 <= t < model.vocab]
        if bad:
            raise RequestError(
                f"Field '{field}' holds token id {bad[0]}, outside this model's vocabulary "
                f"[0, {model.vocab}); use ids below {model.vocab}.",
                param=field,
            )


def _bias_ids(req: SamplingFields) -> list[int]:
    """logit_bias's keys as token ids (OpenAI sends them as decimal strings)."""
    ids = []
    for key in req.logit_bias or {}:
        if not re.fullmatch(r"-?[0-9]{1,12}", key):
            raise RequestError(
                f"Field 'logit_bias' has the key {key!r}, which is no token id; key the biases "
                'by token ids written as decimal strings ({"50256": -100}).',
                param="logit_bias",
            )
        ids.append(int(key))
    return ids


def _grammar(req: SamplingFields, model: ModelView) -> str | None:
    """The checked grammar of response_format, guided_regex or guided_choice (one at most)."""
    fmt = (
        req.response_format if req.response_format and req.response_format.type != "text" else None
    )
    asked = [
        name
        for name, value in (
            ("response_format", fmt),
            ("guided_regex", req.guided_regex),
            ("guided_choice", req.guided_choice),
        )
        if value is not None
    ]
    if not asked:
        return None
    if len(asked) > 1:
        raise RequestError(
            f"Fields {' and '.join(repr(a) for a in asked)} each constrain the output; keep one.",
            param=asked[1],
        )
    if model.grammars is None:
        raise RequestError(
            f"Model '{model.name}' carries no tokenizer, so '{asked[0]}' cannot map a grammar "
            "to its tokens; remove the field.",
            param=asked[0],
            code="no_tokenizer",
        )
    if fmt is not None:
        spec = fmt.json_schema
        if fmt.type == "json_schema" and (spec is None or spec.json_schema is None):
            raise RequestError(
                "Field 'response_format' of type 'json_schema' needs 'json_schema': "
                '{"name": ..., "schema": {...}}; add the schema.',
                param="response_format.json_schema",
            )
        schema = spec.json_schema if fmt.type == "json_schema" and spec else None
        grammar, param = grammar_for_json_schema(schema), "response_format.json_schema"
        if fmt.type == "json_object":
            param = "response_format"
    elif req.guided_regex is not None:
        grammar, param = grammar_for_regex(req.guided_regex), "guided_regex"
    else:
        assert req.guided_choice is not None
        grammar, param = grammar_for_choice(req.guided_choice), "guided_choice"
    model.grammars.check(grammar, param)
    return grammar


def _encode(text: str, model: ModelView) -> list[int]:
    if model.tokenizer is None:
        raise RequestError(
            f"Model '{model.name}' carries no tokenizer, so a text prompt cannot be encoded; "
            "send 'prompt' as a list of token ids.",
            param="prompt",
            code="no_tokenizer",
        )
    return model.tokenizer.encode(text)


def _prepared(
    req: SamplingFields,
    ids: list[int],
    length: tuple[str, int | None],
    model: ModelView,
    logprobs: int | None,
) -> Prepared:
    """Check the prompt and the length field against the context; build the sampling params.

    `length` is the field that sets the length (max_tokens or max_completion_tokens) and its value;
    `logprobs` the number of top logprobs per token (None: no logprobs).
    """
    (field, max_tokens), n, ctx = length, len(ids), model.max_context
    if n == 0:
        raise RequestError(
            "The prompt encodes to no tokens; send a non-empty prompt.", param="prompt"
        )
    if n >= ctx:
        raise RequestError(
            f"The prompt has {n} tokens; this model's context is {ctx} tokens (prompt plus at "
            f"least one new token): shorten the prompt to at most {ctx - 1} tokens.",
            param="prompt",
            code="context_length_exceeded",
        )
    room = ctx - n
    if max_tokens is None:
        max_tokens = min(16, room) if isinstance(req, CompletionRequest) else room
    if max_tokens < 1 or max_tokens > room:
        raise RequestError(
            f"Field '{field}' = {max_tokens}: must be between 1 and {room} (this model's "
            f"context of {ctx} tokens minus the prompt's {n}); ask for fewer tokens or shorten "
            "the prompt.",
            param=field,
            code="context_length_exceeded" if max_tokens > room else "invalid_value",
        )
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP_STRINGS or any(s == "" for s in stop):
        raise RequestError(
            f"Field 'stop' = {stop!r}: give up to {MAX_STOP_STRINGS} non-empty strings.",
            param="stop",
        )
    top_k = req.top_k or 0
    try:
        params = SamplingParams(
            max_new_tokens=max_tokens,
            min_new_tokens=req.min_tokens or 0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=0 if top_k == -1 else top_k,
            top_p=1.0 if req.top_p is None else req.top_p,
            repetition_penalty=req.repetition_penalty or 1.0,
            seed=req.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=tuple(zip(_bias_ids(req), (req.logit_bias or {}).values(), strict=True)),
            logprobs=logprobs,
        )
    except ConfigError as e:  # names the field and its allowed range
        name = _field_of(str(e))
        if name == "logprobs" and isinstance(req, ChatRequest):
            name = "top_logprobs"
        raise RequestError(f"{e} Change it in the request.", param=name) from None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    grammar = _grammar(req, model)
    return Prepared(ids, params, bool(req.stream), include_usage, req.n or 1, grammar)


def _field_of(message: str) -> str | None:
    names = {
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "min_new_tokens",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "logprobs",
    }
    for name in names:
        if f" {name}=" in message:
            return "min_tokens" if name == "min_new_tokens" else name
    return None
