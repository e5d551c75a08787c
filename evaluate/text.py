"""The held-out text `kiln eval` scores, and the tokenizer that turns it into ids.

Default text: `heldout.txt` beside the model, or beside the Hugging Face folder an ONNX
artifact was exported from (its export.json `source.path`): models/eval-llama ships one.
Candidate and reference must tokenize alike, so the reference's tokenizer.json must hash the
same as the candidate's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError, ConfigError

HELDOUT_FILE = "heldout.txt"


@dataclass(frozen=True)
class EvalText:
    """The text, its hash and its token ids (BOS first when the tokenizer adds one)."""

    path: Path
    sha256: str
    bytes: int
    ids: list[int]
    total_tokens: int  # before --tokens cut it

    def describe(self) -> dict[str, Any]:
        """The text's part of the protocol."""
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "bytes": self.bytes,
            "tokens_in_text": self.total_tokens,
            "tokens_used": len(self.ids),
        }


def _source_folder(path: Path) -> Path | None:
    """The Hugging Face folder an ONNX artifact was exported from, if its manifest names one."""
    if not (path / "export.json").is_file():
        return None
    from kiln.manifests import ExportManifest

    return Path(ExportManifest.read(path).source["path"])


def default_text(model: Path) -> Path:
    """heldout.txt beside `model` or beside its export's source folder; else say to pass --text."""
    places = [model]
    if (source := _source_folder(model)) is not None:
        places.append(source)
    for folder in places:
        if (folder / HELDOUT_FILE).is_file():
            return folder / HELDOUT_FILE
    raise ConfigError(
        f"no {HELDOUT_FILE} in {' or '.join(str(p) for p in places)}; pass the text to score "
        "with --text FILE (held-out text the model never saw in training)."
    )


def tokenizer_folder(model: Path) -> Path:
    """The folder whose tokenizer.json encodes the text for `model`."""
    if (model / "tokenizer.json").is_file():
        return model
    raise ArtifactError(
        f"{model} has no tokenizer.json, so the text cannot be encoded; export from a model "
        "folder with tokenizer files (kiln export carries them)."
    )


def check_same_tokenizer(candidate: Path, reference: Path) -> None:
    """Refuse a reference whose tokenizer differs: positions would not line up."""
    a, b = (tokenizer_folder(p) / "tokenizer.json" for p in (candidate, reference))
    if hashlib.sha256(a.read_bytes()).digest() != hashlib.sha256(b.read_bytes()).digest():
        raise ConfigError(
            f"{a} and {b} differ: candidate and reference must share a tokenizer; pass a "
            "reference made from the same model (its fp32 export or its Hugging Face folder)."
        )


def load_text(path: Path, tokenizer_dir: Path, tokens: int | None) -> EvalText:
    """Read and encode `path` with the tokenizer in `tokenizer_dir`; keep the first `tokens`."""
    if not Path(path).is_file():
        raise ConfigError(f"--text {path} is not a file; pass a UTF-8 text file.")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--text {path} is not UTF-8 ({e}); convert it first.") from e
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = [int(i) for i in tok(text, verbose=False)["input_ids"]]  # no max-length warning
    if tokens is not None and tokens < 2:
        raise ConfigError(f"--tokens {tokens}: perplexity needs at least 2 tokens.")
    return EvalText(Path(path), hashlib.sha256(raw).hexdigest(), len(raw), ids[:tokens], len(ids))
