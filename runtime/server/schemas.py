"""Request schemas of the OpenAI completions and chat completions APIs, validated by pydantic.

Strict types: `"max_tokens": "5"` is an error, not a silent conversion. A field this server
does not implement is refused with a 400 naming it (param = the field), so a client never gets
a silently different answer: OpenAI features such as `tools`, `echo` or `best_of` unless set to
their neutral value (_UNSUPPORTED), and any field the schemas do not know.
Ignored, because they never change the answer: `user` and `metadata` (the caller's labels for
its own logs), `store` when false and `service_tier` when "auto" or "default" (_IGNORED; this
server stores nothing and has one tier). `parse_request` turns every failure into a
RequestError naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kiln.errors import RequestError
from kiln.runtime.sampling import MAX_TOP_LOGPROBS

T = TypeVar("T", bound=BaseModel)

_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_DEPTH = 32  # arrays and objects in a request (the request types nest 5 deep)
MAX_N = 16  # choices per request (each takes a slot)

# Fields of the OpenAI API that this server does not implement, with their neutral values
# (sent at a neutral value they ask for nothing and pass).
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "prompt_cache_key": (None,),
    "safety_identifier": (None,),
}
# Fields accepted and ignored, with the values that are ignored (None: any value).
_IGNORED: dict[str, tuple[Any, ...] | None] = {
    "user": None,
    "metadata": None,
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
}


class StreamOptions(BaseModel):
    """`stream_options`: include_usage adds a last chunk with the token counts."""

    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: a named JSON Schema the output must validate against."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`response_format`: free text, any JSON object, or JSON valid under a schema."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    """Fields both endpoints share: model, length, sampling, stop rules, streaming."""

    model_config = ConfigDict(strict=True, extra="ignore")  # _refuse_unsupported names extras

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None  # extension (vLLM): 0 or -1 keeps every token
    min_tokens: int | None = Field(default=None, ge=0)  # extension (vLLM)
    repetition_penalty: float | None = Field(default=None, gt=0)  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    seed: int | None = None  # choice i of n samples with seed + i
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> [-100, 100]
    response_format: ResponseFormat | None = None
    guided_regex: str | None = None  # extension (vLLM): the whole output matches the regex
    guided_choice: list[str] | None = Field(default=None, min_length=1)  # extension (vLLM)


class CompletionRequest(SamplingFields):
    """POST /v1/completions: one prompt, as text or as token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # top tokens listed


class TextPart(BaseModel):
    """One part of a message's content list; only text parts exist for a text model."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn: a role and its text."""

    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    """POST /v1/chat/completions: a conversation rendered by the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


def parse_request(body: bytes, schema: type[T]) -> T:
    """Decode, parse and validate a request body, or raise a RequestError saying what to fix."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(
            f"Request body is not valid UTF-8 (byte {body[e.start : e.start + 1]!r} at offset "
            f"{e.start}); send the JSON encoded as UTF-8.",
            code="invalid_utf8",
        ) from None
    if not text.strip():
        raise RequestError(
            "Request body is empty; send a JSON object such as "
            '{"model": "...", "prompt": "Hello", "max_tokens": 16}.',
            code="invalid_json",
        )
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(
            f"Request body is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "send one JSON object, with double-quoted keys and no trailing commas.",
            code="invalid_json",
        ) from None
    except RecursionError:  # the parser recurses once per nested array or object
        raise RequestError(
            "Request body nests arrays or objects too deeply to parse; send the request "
            "fields, which nest at most 5 levels (messages.0.content.0.text).",
            code="invalid_json",
        ) from None
    if not isinstance(data, dict):
        raise RequestError(
            f"Request body is a JSON {type(data).__name__}, not an object; send a JSON object "
            "with the request fields.",
            code="invalid_json",
        )
    _check_structure(data)
    try:
        req = schema.model_validate_json(text)
    except ValidationError as e:
        raise _request_error(e) from None
    _refuse_unsupported(data, schema)
    return req


def _check_structure(data: dict[str, Any]) -> None:
    r"""Refuse what JSON lets through but no request holds, naming the field.

    That is a string with half of a UTF-16 surrogate pair (`"\ud800"`), or arrays and objects
    nested deeper than MAX_DEPTH. Lone surrogates are no Unicode characters: the tokenizer cannot
    encode them and no answer could carry them back as UTF-8. The request types nest 5 levels
    (messages.0.content.0.text); pydantic's JSON parser gives up on deeper nesting without saying
    where. The walk is iterative, so a body nested as deeply as the JSON parser allows cannot
    exhaust the stack here.
    """
    todo: list[tuple[tuple[str, ...], Any]] = [((), data)]
    while todo:
        path, value = todo.pop()
        if len(path) > MAX_DEPTH:
            raise RequestError(
                f"Field '{_escaped(path[0])}' nests arrays or objects more than {MAX_DEPTH} "
                "levels deep; the request fields nest at most 5 levels: flatten it.",
                param=_escaped(path[0]),
                code="invalid_value",
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    raise _surrogate_error((*path, key), key, "Key")
                todo.append(((*path, key), item))
        elif isinstance(value, list):
            todo.extend(((*path, str(i)), item) for i, item in enumerate(value))
        elif isinstance(value, str) and _SURROGATE.search(value):
            raise _surrogate_error(path, value, "Field")


def _surrogate_error(path: tuple[str, ...], text: str, what: str) -> RequestError:
    """The error of a lone surrogate in `text`, the key or field (`what`) at `path`."""
    where = _escaped(".".join(path))
    bad = _escaped(_SURROGATE.findall(text)[0])
    return RequestError(
        f"{what} '{where}' holds the lone UTF-16 surrogate {bad}, which is not a Unicode "
        "character; send the character itself or its complete surrogate pair.",
        param=where,
        code="invalid_unicode",
    )


def _escaped(text: str) -> str:
    """`text` with each lone surrogate written as a backslash escape, safe to encode."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _request_error(e: ValidationError) -> RequestError:
    """The first field's validation error, worded as what to change, naming the field.

    A field that takes several types (prompt: text or token ids) fails once per type; those
    errors are joined ("a valid string or a valid list").
    """
    errors = e.errors(include_url=False)
    loc = _field_path(errors[0]["loc"])
    if errors[0]["type"] == "missing":
        return RequestError(
            f"Field '{loc}' is required; add it to the request.", param=loc, code="missing_field"
        )
    same = [err for err in errors if _field_path(err["loc"]) == loc]
    why = " or ".join(dict.fromkeys(err["msg"] for err in same))
    got = _short(same[0].get("input"))
    others = {_field_path(err["loc"]) for err in errors} - {loc}
    more = f" (also invalid: {', '.join(sorted(others))})" if others else ""
    return RequestError(
        f"Field '{loc}' = {got} is invalid: {why}; change it and retry{more}.",
        param=loc,
        code="invalid_type" if "type" in same[0]["type"] else "invalid_value",
    )


def _field_path(loc: tuple[Any, ...]) -> str:
    """`messages.0.content`: the loc without pydantic's union member tags (`str`, `list[int]`)."""
    tags = {"str", "int", "float", "bool"}
    parts = [str(p) for p in loc if not (str(p) in tags or "[" in str(p))]
    return ".".join(parts) or "body"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _refuse_unsupported(data: dict[str, Any], schema: type[BaseModel]) -> None:
    """Refuse a field this server would otherwise ignore: a 400 naming it (see module doc)."""
    for name, value in data.items():
        if name in schema.model_fields or _IGNORED.get(name, ()) is None:
            continue
        neutral = _UNSUPPORTED.get(name, _IGNORED.get(name))
        if neutral is not None and value in neutral:
            continue
        if name in _UNSUPPORTED or name in _IGNORED:
            why = f"Field '{name}' = {_short(value)} is not supported by this server; remove it "
            why += "(or leave it at its default)."
        else:
            why = f"Field '{name}' is not a field this server implements; remove it."
        raise RequestError(
            why,
            param=name,
            code="unsupported_parameter",
        )
