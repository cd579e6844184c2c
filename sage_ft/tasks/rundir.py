"""What the task manager reads from a run directory (written by ``sage_ft.training``).

Layout (docs/architecture.md): ``events.jsonl``, ``logs.txt``, ``finetune_meta.json``,
``checkpoint-N/``, ``lora/``, ``merged_model/``, ``config.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_ft.events import read_events
from sage_ft.filetail import tail_lines
from sage_ft.tasks.checkpoints import checkpoint_problem

log = logging.getLogger(__name__)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Files that mark a directory as a sage-ft run, so delete(remove_files=True) never wipes anything else.
RUN_MARKERS = ("events.jsonl", "finetune_meta.json", "logs.txt", "config.yaml")


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` directory, intact or not, oldest first (``checkpoint-N.tmp`` staging
    folders of a save that never finished are not among them)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoints a resume can use (``checkpoints.checkpoint_problem`` finds nothing), oldest first."""
    return [path for path in checkpoint_folders(output_dir) if checkpoint_problem(path) is None]


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest intact checkpoint (a damaged newer one is passed over; ``resume_choice`` names it)."""
    return resume_choice(output_dir).checkpoint


@dataclass(frozen=True)
class ResumeChoice:
    """Where a resume continues: the newest intact checkpoint, and the newer ones passed over as damaged."""

    checkpoint: Path | None
    damaged: list[tuple[Path, str]] = field(default_factory=list)  # (folder, what is wrong), newest first

    @property
    def note(self) -> str | None:
        """'checkpoint-40 is damaged (…); continuing from checkpoint-30' (None when nothing was skipped)."""
        if not self.damaged:
            return None
        text = "; ".join(f"{path.name} is damaged ({problem})" for path, problem in self.damaged)
        return text + (f"; continuing from {self.checkpoint.name}" if self.checkpoint else "")


def resume_choice(output_dir: str | Path) -> ResumeChoice:
    damaged: list[tuple[Path, str]] = []
    for folder in reversed(checkpoint_folders(output_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return ResumeChoice(folder, damaged)
        damaged.append((folder, problem))
    return ResumeChoice(None, damaged)


def checkpoint_step(path: str | Path) -> int:
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else 0


def metrics_history(output_dir: str | Path) -> list[dict[str, Any]]:
    """The run's ``metric_update`` events (loss curve, learning rate, eval loss), one per step and
    kind, in step order: the curve the Monitor, ``sage-ft tasks show`` and ``compare`` draw.

    ``events.jsonl`` is the append-only record of every attempt. After a resume from checkpoint-N,
    the steps the abandoned attempt logged after N are trained again; once the resumed attempt logs,
    its values replace them (a run killed at 33 and resumed from 30 logged 31-33 twice, and the loss
    line turned back on itself). Read incrementally: a page watching a long run asks for this every
    2 s, and re-parsing an events file of hours of steps each time would make monitoring cost grow
    with the run's length.
    """
    return _HISTORY.get(Path(output_dir) / "events.jsonl")


class _History:
    """The metric events of one events file read so far, and where a resumed attempt cuts them."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.cut_after: int | None = None  # set by a training_start: steps after it are being redone

    def add(self, events: list[dict[str, Any]]) -> None:
        for event in events:
            kind = event.get("event")
            if kind == "training_start":
                start = event.get("start_step")
                self.cut_after = start if isinstance(start, int) else 0
            elif kind == "metric_update":
                if self.cut_after is not None:  # the new attempt logs: the old one's later steps go
                    cut = self.cut_after
                    self.events = [e for e in self.events if not (isinstance(e.get("step"), int) and e["step"] > cut)]
                    self.cut_after = None
                self.events.append(event)


class _MetricsHistoryCache:
    """Per events file: the metric history read so far and the byte offset reached.

    The file is only ever appended to; a file that was replaced (its first bytes, which hold the
    first event's timestamp, differ — inode numbers get reused) or is shorter than the offset is
    read again from the start. Bounded to the most recently used files.
    """

    MAX_FILES = 32

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Path, tuple[bytes, int, _History]] = OrderedDict()

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
                cached = (identity, 0, _History())
            _, offset, history = cached
            if stat.st_size > offset:
                events, offset = read_events(path, offset)
                history.add(events)
            self._entries[path] = (identity, offset, history)
            self._entries.move_to_end(path)
            while len(self._entries) > self.MAX_FILES:
                self._entries.popitem(last=False)
            return list(history.events)  # callers get their own list


_HISTORY = _MetricsHistoryCache()


def stage_since(output_dir: str | Path, since: float, max_bytes: int = 256 * 1024) -> dict[str, Any] | None:
    """The newest ``preparing`` or ``training_start`` event at or after ``since`` (an attempt's start),
    read from the end of the run's ``events.jsonl``, which gets each event as it happens; None when the
    attempt has written neither yet. The task's row, written once a second by the process that runs it,
    can be a stage behind (still "preparing" after the first steps)."""
    try:
        lines = tail_lines(Path(output_dir) / "events.jsonl", 10_000, max_bytes).splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if '"preparing"' not in line and '"training_start"' not in line:
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # the first line of the tail can be cut
            continue
        if event.get("event") in ("preparing", "training_start") and isinstance(event.get("time"), (int, float)):
            return event if event["time"] >= since else None
    return None


def log_tail(output_dir: str | Path, lines: int = 50, max_bytes: int = 64 * 1024) -> str:
    """The last ``lines`` lines of ``logs.txt`` (reads at most ``max_bytes`` from the end)."""
    path = Path(output_dir) / "logs.txt"
    if not path.exists():
        return ""
    return tail_lines(path, lines, max_bytes)


def append_run_log(output_dir: str | Path, line: str) -> None:
    """Add a line from the task manager to the run's ``logs.txt`` (never raises: best effort)."""
    try:
        path = Path(output_dir) / "logs.txt"
        if path.parent.is_dir():
            with path.open("a", encoding="utf-8") as fh:
                fh.write(line.rstrip("\n") + "\n")
    except OSError as exc:
        log.warning("could not write to %s/logs.txt: %s", output_dir, exc)


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
