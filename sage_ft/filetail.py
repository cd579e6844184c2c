"""The last lines of a growing text file (a log), reading only its end.

Logs of long runs and servers grow without bound; the UI shows their tails on every refresh, so a
tail must cost the same for a 1 KB file and a 1 GB one.
"""

from __future__ import annotations

from pathlib import Path


def tail_lines(path: str | Path, lines: int, max_bytes: int) -> str:
    """The last ``lines`` lines of ``path``, from at most its last ``max_bytes`` bytes (undecodable
    bytes replaced). Raises ``OSError`` when the file cannot be read."""
    with Path(path).open("rb") as fh:
        fh.seek(0, 2)
        fh.seek(max(0, fh.tell() - max_bytes))
        data = fh.read()
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])
