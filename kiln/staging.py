"""Staging folders: every stage builds beside its output and renames the result into place.

A build writes into `.<out>.XXXX.tmp` beside `out` (staging_dir) and renames it into place
(publish_dir), so readers see the old folder or the new one whole. SIGKILL (or a power cut)
leaves that folder, often hundreds of MB, and publish_dir's `.<out>.old-PID` if it died between
its two renames. Each build holds an
exclusive flock on its own staging folder while it runs, so the next build of the same `out`
can tell a dead build's folder (lock free) from a live one's (lock held) and removes only the
dead ones. The lock dies with the process, so no stale lock can block anyone.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


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


# A folder younger than this may be a concurrent build between mkdtemp and its flock.
GRACE_S = 5.0


@contextlib.contextmanager
def locked_staging(out: Path) -> Iterator[Path]:
    """A fresh staging folder for `out`, flock-ed for as long as the block runs.

    Stale staging folders of earlier, dead builds of `out` are removed first; the block's own
    folder is removed when it raises.
    """
    remove_stale(out)
    staged = staging_dir(out)
    fd = os.open(staged, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)  # a failed build leaves nothing behind
        raise
    finally:
        os.close(fd)  # releases the lock (also when the folder was renamed to `out`)


def remove_stale(out: Path, *, grace_s: float = GRACE_S) -> list[Path]:
    """Remove `.<out>.*.tmp` folders no live build holds, and dead publishers' `.old-PID`."""
    if not out.parent.is_dir():
        return []
    tmp = re.compile(rf"^\.{re.escape(out.name)}\..+\.tmp$")
    old = re.compile(rf"^\.{re.escape(out.name)}\.old-(\d+)$")
    removed = []
    for p in out.parent.iterdir():
        if not p.is_dir() or p.is_symlink():
            continue
        if tmp.match(p.name):
            stale = _unlocked(p) and time.time() - p.stat().st_mtime > grace_s
        elif m := old.match(p.name):
            stale = not _alive(int(m.group(1)))
        else:
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if removed:
        log.info(
            "removed %d staging folder(s) of earlier builds that did not finish: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def _unlocked(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # a live build holds it
    else:
        return True  # closing the fd below drops our lock again
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True
