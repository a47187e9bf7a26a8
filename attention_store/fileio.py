"""Atomic file writes: a reader sees no file, the old file or the whole new one, never a half-written one."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# Hard links are how `publish` refuses to replace a file; a filesystem without them (some network
# or FAT mounts) falls back to a rename, which still never exposes a partial file.
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def _write_temp(path: Path, data: bytes | str) -> str:
    """A fsynced temp file holding `data` next to `path` (same folder, so link/rename stay atomic)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cache files are meant to be readable like any file
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a temp file in the same folder, fsync, then rename over it.

    Temp names start with `.` and end in `.tmp`, so a killed writer's leftover never looks like the
    real file; two writers of the same path race only to rename complete files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def publish(path: Path, data: bytes | str) -> bool:
    """Create `path` holding `data` unless it exists; True if this call created it.

    The complete temp file is hard-linked to the final name, and `link` fails when the name exists:
    of several processes writing the same content-keyed file, exactly one publishes and the others
    skip, and no reader ever sees a partial file. A writer killed at any point leaves at most a temp
    file (see `remove_stale_temp` in the disk tier), never a file under the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _write_temp(path, data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
            log.debug("no hard links in %s (%s); publishing %s by rename", path.parent, e, path.name)
            if path.exists():
                return False
            os.replace(tmp, path)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
