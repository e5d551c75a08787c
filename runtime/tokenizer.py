"""The runtime's tokenizer: tokenizer.json through `tokenizers`, chat templates through jinja2.

transformers' AutoTokenizer imports torch (seconds and ~300 MB in a serving process that needs
neither). This module reads the same files (tokenizer.json, tokenizer_config.json,
chat_template.jinja) and does what transformers' TokenizersBackend does with them: the named
special tokens of tokenizer_config.json, BOS/EOS as tokenizer.json's post-processor adds them
(transformers ignores the config's `add_bos_token` when tokenizer.json exists), decode with
`clean_up_tokenization_spaces` (never on BPE), and chat templates rendered in transformers'
jinja2 environment. tests/runtime/test_tokenizer.py checks every path against transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer

from kiln.errors import ArtifactError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
LEGACY_MAP_FILE = "special_tokens_map.json"
# The named special tokens a chat template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Decoder(Protocol):
    """What detokenization needs: this module's Tokenizer, or a transformers tokenizer."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...  # noqa: D102


class Tokenizer:
    """Text <-> ids and chat rendering for one model folder, without transformers."""

    def __init__(
        self,
        backend: RustTokenizer,
        config: Mapping[str, Any],
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.special_tokens = {
            name: text for name in SPECIAL_NAMES if (text := _token_text(config.get(name)))
        }
        missing = [t for t in self.special_tokens.values() if backend.token_to_id(t) is None]
        if missing:  # transformers adds named special tokens the file lacks
            backend.add_special_tokens(
                [AddedToken(t, special=True, normalized=False) for t in missing]
            )
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE"  # transformers skips the cleanup for BPE
        )
        self.chat_template = chat_template

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer | None:
        """The folder's tokenizer, or None when it has no tokenizer.json."""
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            return None
        config = _config(folder)
        template_path = folder / TEMPLATE_FILE
        if template_path.is_file():
            template: str | None = template_path.read_text()
        else:
            template = _default_template(config.get("chat_template"), folder)
        return cls(RustTokenizer.from_file(str(path)), config, template)

    @property
    def bos_token_id(self) -> int | None:
        """Id of the BOS token, None when the model has none."""
        return self._id_of("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of the EOS token, None when the model has none."""
        return self._id_of("eos_token")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with BOS/EOS as the tokenizer's post-processor adds them."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (the signature of transformers' decode, so either tokenizer fits)."""
        text = str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))
        return _clean_up(text) if self.clean_up_spaces else text

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> str:
        """The conversation as text, through the chat template (raises ValueError without one).

        A template's own `raise_exception` raises jinja2.TemplateError with its message.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template")
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
        return str(
            _compiled(self.chat_template).render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of the rendered conversation; the template writes any BOS, so none is added."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)

    def _id_of(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return None if text is None else self.backend.token_to_id(text)


def load_tokenizer(folders: Sequence[Path]) -> Tokenizer | None:
    """The tokenizer of the first folder with tokenizer files, or None when none has any."""
    for folder in folders:
        tok = Tokenizer.from_folder(folder)
        if tok is not None:
            return tok
        if (folder / CONFIG_FILE).is_file():
            raise ArtifactError(
                f"{folder} has {CONFIG_FILE} but no {TOKENIZER_FILE}, the only tokenizer format "
                "the runtime reads; save one from the source model with transformers "
                f"(AutoTokenizer.from_pretrained(src).save_pretrained('{folder}'))."
            )
    return None


def _config(folder: Path) -> dict[str, Any]:
    """The tokenizer config, a legacy special_tokens_map.json merged in as transformers does."""
    path = folder / CONFIG_FILE
    config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    legacy = folder / LEGACY_MAP_FILE
    if "added_tokens_decoder" not in config and legacy.is_file():
        config.update(
            {k: v for k, v in json.loads(legacy.read_text()).items() if k in SPECIAL_NAMES}
        )
    return config


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _default_template(value: Any, folder: Path) -> str | None:
    """tokenizer_config.json's chat_template: one string, or named ones (the 'default')."""
    if value is None or isinstance(value, str):
        return value
    named = {t["name"]: t["template"] for t in value} if isinstance(value, list) else dict(value)
    if "default" not in named:
        raise ArtifactError(
            f"{folder / CONFIG_FILE} has chat templates {sorted(named)} and none named 'default'; "
            "name one 'default' or write it to chat_template.jinja."
        )
    return str(named["default"])


def _clean_up(text: str) -> str:
    """No space before punctuation and contractions (transformers' clean_up_tokenization)."""
    for a, b in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(a, b)
    return text


@lru_cache(maxsize=8)
def _compiled(template: str) -> Any:
    """The template compiled in transformers' environment (chat templates are untrusted code).

    Sandboxed, trim_blocks and lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII
    and does not escape HTML, `raise_exception`, `strftime_now`. The `{% generation %}` tag
    (assistant masks for training) is not supported: serving never asks for masks.
    """
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
