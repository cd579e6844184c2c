"""Atomic file writes: temp file in the same folder, fsync, rename.

A crash (or a full disk) mid-write leaves the previous version of the file, never half of a new
one. Every state file sage-ft writes (run meta, the server registry, generated datasets, saved
configs) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_writer(path: str | Path, *, mode: int | None = None) -> Iterator[IO[str]]:
    """``with atomic_writer(p) as fh: fh.write(...)`` — ``p`` appears complete or not at all.

    ``mode`` sets the permission bits before any byte is written (e.g. 0o600 for files holding keys).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_in_the_way(path: str | Path) -> Path | None:
    """A file where a folder above ``path`` must be (None when there is none): writing there would
    fail with a bare FileExistsError or NotADirectoryError, so callers refuse it with a sentence first."""
    return next((p for p in Path(path).absolute().parents if p.exists() and not p.is_dir()), None)


def output_path_problem(path: str | Path) -> str | None:
    """Why nothing can be written at ``path``, as the end of a sentence: a file where a folder above it
    must be, or a name the file system refuses (longer than it allows); None when it can be. Asked
    before any work, so a bad output is refused plainly, not with a FileExistsError or "File name too
    long" traceback once the work is done."""
    try:
        blocker = file_in_the_way(path)
        Path(path).exists()  # raises for a name longer than the file system allows
    except OSError as exc:
        text = str(path)
        shown = text if len(text) <= 80 else f"{text[:80]}… ({len(text)} characters)"
        return f"{shown} cannot be used as a path ({exc.strerror})"
    return f"{blocker} is a file, not a folder" if blocker is not None else None
