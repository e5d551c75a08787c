"""The one skeleton every stage runs in: reuse check, locked staging, manifest last, publish.

```python
key = cache_key("kiln.export", inputs=..., options=..., versions=...)
with publishing(out, ExportManifest, key=key, force=force) as stage:
    if stage.reused:
        return out
    ...  # the stage's own work, writing into stage.dir
    stage.finish(ExportManifest(cache_key=stage.key, ...))
```

On a normal exit the manifest is written last (a folder without it is unfinished) and the
staging folder replaces `out` atomically. On an error the staging folder is removed; a killed
build's folder is removed by the next build of the same `out` (kiln/staging.py).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from kiln.artifacts import sha256_file
from kiln.errors import ArtifactError
from kiln.manifests import Manifest
from kiln.staging import locked_staging, publish_dir

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Manifest)


@dataclass
class Stage(Generic[M]):
    """One run of a stage: where to write (`dir`), its cache key, and the manifest to publish."""

    out: Path
    reused: bool
    dir: Path = Path()  # the staging folder (not set when reused)
    manifest: M | None = None
    _key: str | Callable[[], str] = field(default="", repr=False)

    @property
    def key(self) -> str:
        """The cache key (computed on first use when the stage gave a function)."""
        if callable(self._key):
            self._key = self._key()
        return self._key

    def finish(self, manifest: M) -> None:
        """The manifest to write last, when the block ends without an error."""
        self.manifest = manifest


@contextlib.contextmanager
def publishing(
    out: Path, kind: type[M], *, key: str | Callable[[], str], force: bool = False
) -> Iterator[Stage[M]]:
    """Run a stage's block in a locked staging folder and publish it as `out`.

    Args:
        out: the artifact folder to make.
        kind: the stage's manifest record (kiln/manifests.py).
        key: the cache key (kiln.artifacts.cache_key), or a function computing it; called only
            when `out` already holds a manifest to compare, or when the manifest is made.
        force: rebuild even when `out` is up to date.

    The block sees `stage.reused` True (and must return) when `out` already holds a manifest of
    the same key whose main file still has the recorded hash.
    """
    out = Path(out)
    stage: Stage[M] = Stage(out, reused=False, _key=key)
    if not force and is_current(out, kind, stage.key if (out / kind.FILE).is_file() else None):
        log.info("%s: %s is up to date (cache key %s); reusing it", kind.KIND, out, stage.key[:12])
        stage.reused = True
        yield stage
        return
    with locked_staging(out) as staged:
        stage.dir = staged
        yield stage
        if stage.manifest is None:
            raise RuntimeError(f"the {kind.KIND} stage ended without a manifest for {out}")
        stage.manifest.write(staged)  # last: a folder without it is unfinished
        publish_dir(staged, out)


def is_current(out: Path, kind: type[Manifest], key: str | None) -> bool:
    """True when `out` holds a finished `kind` artifact of cache `key`, its main file untouched.

    A manifest that cannot be read (another format, a missing field) is not current: the
    stage rebuilds it.
    """
    if key is None:
        return False
    try:
        manifest = kind.read(out)
    except ArtifactError:
        return False
    name, sha = manifest.main_file()
    return manifest.cache_key == key and (out / name).is_file() and sha256_file(out / name) == sha
