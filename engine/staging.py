"""Staging folders that a killed build does not leave behind for good.

A build writes into `.<out>.XXXX.tmp` beside `out` and renames it into place (kiln.manifest
staging_dir / publish_dir). SIGKILL (or a power cut) leaves that folder, often hundreds of MB,
and publish_dir's `.<out>.old-PID` if it died between its two renames. Each build holds an
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
import time
from collections.abc import Iterator
from pathlib import Path

from kiln.manifest import staging_dir

log = logging.getLogger(__name__)

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
