"""Artifact folders and their manifests: atomic writes, content hashes, tool versions.

Stages talk through folders: each holds its files plus a JSON manifest written last, so a
folder without a manifest is incomplete and gets rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError, KilnError

_CHUNK = 1 << 20

# Files every artifact folder carries from its source, so each stage's folder is self-contained
# for the runtime: the model's config, generation defaults and tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
)
CARRIED_FILES = ("config.json", *TOKENIZER_FILES)


def copy_carried_files(src: Path, dst: Path) -> list[str]:
    """Copy the CARRIED_FILES that `src` has into `dst`; return their names."""
    copied = [n for n in CARRIED_FILES if (src / n).is_file()]
    for name in copied:
        shutil.copy2(src / name, dst / name)
    return copied


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of one file, streamed so multi-GB weights do not load into memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[Path], root: Path) -> str:
    """One hash over several files: their paths relative to `root` and their contents."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode())
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def code_fingerprint(*packages: str) -> str:
    """Hash of the named packages' Python sources, for cache keys.

    The kiln version does not change while a stage's code does; without this an artifact made
    by older code (say, a graph without a newer fusion) would be reused as up to date.
    """
    import importlib.util

    h = hashlib.sha256()
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise KilnError(f"cannot find package {name!r} to fingerprint; reinstall kiln.")
        root = Path(spec.origin).parent
        h.update(name.encode())
        h.update(sha256_files(root.rglob("*.py"), root).encode())
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys), for cache keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def tool_versions(*dists: str) -> dict[str, str]:
    """Installed versions of the named distributions, plus Python's; 'absent' when missing."""
    out = {"python": platform.python_version()}
    for d in dists:
        try:
            out[d] = metadata.version(d)
        except metadata.PackageNotFoundError:
            out[d] = "absent"
    return out


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to a temporary name in the same folder, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_manifest(folder: Path, name: str, *, made_by: str) -> dict[str, Any]:
    """Load `folder/name`, or raise an ArtifactError naming the command that makes it."""
    path = folder / name
    if not path.is_file():
        raise ArtifactError(
            f"{folder} has no {name}: it is missing or incomplete; create it with `{made_by}`."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"{path} is not valid JSON ({e}); delete it and rerun `{made_by}`."
        ) from e


def staging_dir(final: Path) -> Path:
    """A fresh temporary folder beside `final`, on the same filesystem so a rename is atomic."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))


def publish_dir(staged: Path, final: Path) -> None:
    """Replace `final` with `staged` so readers see either the old folder or the new one whole."""
    os.chmod(staged, 0o755)  # mkdtemp creates 0700
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_records(folder: Path, pattern: str) -> dict[str, dict[str, Any]]:
    """Name -> {sha256, bytes} of the files in `folder` matching `pattern`, for a manifest."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.glob(pattern))
        if p.is_file()
    }


def is_current(folder: Path, manifest: str, main_file: str, key: str, *, made_by: str) -> bool:
    """True when `folder` holds a finished artifact built for cache `key`, its file untouched."""
    if not (folder / manifest).is_file() or not (folder / main_file).is_file():
        return False
    recorded = read_manifest(folder, manifest, made_by=made_by)
    sha = recorded.get("files", {}).get(main_file, {}).get("sha256")
    return recorded.get("cache_key") == key and sha == sha256_file(folder / main_file)
