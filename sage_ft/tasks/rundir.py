"""What the task manager reads from a run directory (written by ``sage_ft.training``).

Layout (docs/architecture.md): ``events.jsonl``, ``logs.txt``, ``finetune_meta.json``,
``checkpoint-N/``, ``lora/``, ``merged_model/``, ``config.yaml``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sage_ft.events import read_events
from sage_ft.filetail import tail_lines

log = logging.getLogger(__name__)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# A checkpoint is complete once the Trainer wrote its state file (it is saved after the weights).
_CHECKPOINT_DONE_MARKER = "trainer_state.json"
# Files that mark a directory as a sage-ft run, so delete(remove_files=True) never wipes anything else.
RUN_MARKERS = ("events.jsonl", "finetune_meta.json", "logs.txt", "config.yaml")


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete ``checkpoint-N`` directories, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / _CHECKPOINT_DONE_MARKER).exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def last_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else 0


def metrics_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``metric_update`` event of the run (loss curve, learning rate, eval loss), in order.

    Read incrementally: a page watching a long run asks for this every 2 s, and re-parsing an
    events file of hours of steps each time would make monitoring cost grow with the run's length.
    """
    return _HISTORY.get(Path(output_dir) / "events.jsonl")


class _MetricsHistoryCache:
    """Per events file: the metric events read so far and the byte offset reached.

    The file is only ever appended to; a file that was replaced (its first bytes, which hold the
    first event's timestamp, differ — inode numbers get reused) or is shorter than the offset is
    read again from the start. Bounded to the most recently used files.
    """

    MAX_FILES = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, tuple[bytes, int, list[dict[str, Any]]]] = OrderedDict()

    def get(self, path: Path) -> list[dict[str, Any]]:
        try:
            stat = path.stat()
            with path.open("rb") as fh:
                identity = fh.read(128)
        except OSError:
            return []
        with self._lock:
            cached = self._entries.get(path)
            if cached is None or cached[0] != identity or stat.st_size < cached[1]:
                cached = (identity, 0, [])
            _, offset, history = cached
            if stat.st_size > offset:
                events, offset = read_events(path, offset)
                history.extend(e for e in events if e.get("event") == "metric_update")  # callers get copies
            self._entries[path] = (identity, offset, history)
            self._entries.move_to_end(path)
            while len(self._entries) > self.MAX_FILES:
                self._entries.popitem(last=False)
            return list(history)


_HISTORY = _MetricsHistoryCache()


def log_tail(output_dir: str | Path, lines: int = 50, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of ``logs.txt`` (reads at most ``max_bytes`` from the end)."""
    path = Path(output_dir) / "logs.txt"
    if not path.exists():
        return ""
    return tail_lines(path, lines, max_bytes)


def mark_meta_interrupted(output_dir: str | Path, reason: str) -> None:
    """Make ``finetune_meta.json`` say interrupted, like the task row (never raises: best effort)."""
    from sage_ft.training.meta import mark_interrupted

    try:
        mark_interrupted(output_dir, reason, from_statuses=("running", "cancelled"))
    except OSError as exc:
        log.warning("could not mark %s/finetune_meta.json interrupted: %s", output_dir, exc)


def looks_like_run_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (any((path / marker).exists() for marker in RUN_MARKERS) or not any(path.iterdir()))


def fingerprint_files(files: list[Path]) -> str:
    """sha256 over each file's name and bytes (in the given order): identifies the exact data used."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
