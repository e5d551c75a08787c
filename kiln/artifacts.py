"""Artifact folders: carried files, content hashes, atomic JSON writes, and the cache-key recipe.

Stages talk through folders: each holds its files plus a JSON manifest written last
(kiln/manifests.py), so a folder without a manifest is incomplete and gets rebuilt
(kiln/publish.py).
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

from kiln.errors import KilnError

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


def imported_modules(package: str) -> dict[str, Path]:
    """Name -> source file of `package`'s modules and every kiln module they import.

    Followed through other modules, and read from the sources (import statements, also those
    inside functions), so the answer does not depend on what a process happened to import.
    """
    root = _package_dir(package)
    found = {_module_name(package, root, p): p for p in sorted(root.rglob("*.py"))}
    todo = [m for p in found.values() for m in _kiln_imports(p)]
    while todo:
        name = todo.pop()
        if name in found or (path := _module_file(name)) is None:
            continue
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parents run first
        todo += _kiln_imports(path)
    return dict(sorted(found.items()))


def source_fingerprint(package: str) -> str:
    """Hash of the sources of every module in `imported_modules(package)`."""
    h = hashlib.sha256()
    for name, path in imported_modules(package).items():
        h.update(name.encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def cache_key(package: str, *, inputs: Any, options: Any, versions: dict[str, str]) -> str:
    """The one cache-key recipe every stage uses.

    Rule: a stage's output is reused only when all of these are unchanged: its inputs (hashes
    of the files it reads), its options, the tool versions it records (kiln's version is always
    added), and the sources of every kiln module the stage package imports (source_fingerprint:
    an artifact made by other code, say a graph without a newer fusion, is never reused).
    """
    return sha256_json(
        {
            "inputs": inputs,
            "options": options,
            "versions": {**tool_versions("kiln"), **versions},
            "code": source_fingerprint(package),
        }
    )


def _package_dir(package: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise KilnError(f"cannot find package {package!r} to fingerprint; reinstall kiln.")
    return Path(next(iter(spec.submodule_search_locations)))


def _module_name(package: str, root: Path, path: Path) -> str:
    rel = path.relative_to(root).with_suffix("").parts
    return ".".join((package, *rel)).removesuffix(".__init__")


def _module_file(name: str) -> Path | None:
    """The source file of kiln module `name`, found without importing it."""
    parts = name.split(".")
    if parts[0] != "kiln":
        return None
    if len(parts) == 1:
        return _package_dir("kiln") / "__init__.py"
    try:  # "kiln.X" may map to a folder of its own (pyproject.toml package-dir)
        base, rest = _package_dir(".".join(parts[:2])), parts[2:]
    except KilnError:
        base, rest = _package_dir("kiln"), parts[1:]
    path = base.joinpath(*rest)
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _kiln_imports(path: Path) -> list[str]:
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
    return [n for n in names if n == "kiln" or n.startswith("kiln.")]


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


def file_records(folder: Path, pattern: str) -> dict[str, dict[str, Any]]:
    """Name -> {sha256, bytes} of the files in `folder` matching `pattern`, for a manifest."""
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.glob(pattern))
        if p.is_file()
    }
