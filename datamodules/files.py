"""Writing a file so that a reader, a failure or a kill at any moment sees the old file or the new one, never
a partial one (checkpoints, caches). Lives below the callbacks and the CLI, which both write such files."""
from __future__ import annotations

import os
import tempfile
import typing
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: typing.Callable[[typing.BinaryIO], None]) -> None:
    """`write` into a temporary file in `path`'s folder, fsync, then os.replace: a reader (or a kill at
    any moment) sees the old file or the new one, never a partial one. Every error propagates. The file
    gets the mode a plain open() would give (0666 minus the umask, e.g. 0644), not mkstemp's 0600, so a
    group sharing a results folder can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
