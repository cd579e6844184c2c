"""Training events: an in-process emitter that also appends every event to ``events.jsonl``.

The file is the contract between processes: the UI (or the task manager) follows a run started by
the CLI by reading the file from a remembered byte offset, so nothing needs to be rediscovered.
Listeners never break training: an exception in a listener is logged and swallowed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

EVENT_TYPES = (
    "training_start",
    "training_end",
    "epoch_start",
    "epoch_end",
    "batch_start",
    "batch_end",
    "checkpoint_saved",
    "checkpoint_loaded",
    "metric_update",
    "error_occurred",
    "log",
    "preparing",  # before the first step: phase "data" | "tokenize" (with done/total) | "model"
)

Listener = Callable[[dict[str, Any]], None]

_PHASE_TEXT = {"data": "reading the dataset", "tokenize": "tokenizing", "model": "loading the base model"}


class Preparation(NamedTuple):
    """A ``preparing`` event: what a run does before its first step, so that every client can say
    "tokenizing 12,288/40,000 conversations" instead of "step 0/?" for the minute a large dataset or
    model takes. ``done``/``total``: conversations, while tokenizing."""

    phase: str  # "data" | "tokenize" | "model"
    done: int | None = None
    total: int | None = None

    @classmethod
    def from_fields(cls, phase: Any, done: Any = None, total: Any = None) -> Preparation | None:
        """From an event's (or a task row's) values; None when they do not describe one."""
        if phase not in _PHASE_TEXT:
            return None
        counted = isinstance(done, int) and isinstance(total, int) and total > 0
        return cls(phase, done if counted else None, total if counted else None)

    @classmethod
    def of_event(cls, event: Mapping[str, Any]) -> Preparation | None:
        return cls.from_fields(event.get("phase"), event.get("done"), event.get("total"))

    @property
    def percent(self) -> int | None:
        return self.done * 100 // self.total if self.done is not None and self.total else None

    @property
    def text(self) -> str:
        """In English (the CLI and the logs; the web UI says it in its own language)."""
        if self.phase == "tokenize" and self.total is not None:
            return f"preparing: tokenizing {self.done:,}/{self.total:,} conversations ({self.percent}%)"
        return f"preparing: {_PHASE_TEXT[self.phase]}"


class EventEmitter:
    """``on(event, fn)``, ``emit(event, **data)``, ``get_history()``; thread-safe.

    ``on("*", fn)`` listens to every event. Each event is a dict with ``event``, ``time`` and the
    payload. High-frequency events (``batch_start``/``batch_end``) are throttled to
    ``throttle_s`` in the history and the file, but always reach listeners.
    """

    def __init__(self, events_path: str | Path | None = None, throttle_s: float = 1.0):
        self._listeners: dict[str, list[Listener]] = {}
        self._history: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._path = Path(events_path) if events_path else None
        self._throttle_s = throttle_s
        self._last_throttled: dict[str, float] = {}
        if self._path:
            self._path.parent.mkdir(parents=True, exist_ok=True)

    def on(self, event: str, fn: Listener) -> Listener:
        if event != "*" and event not in EVENT_TYPES:
            raise ValueError(f"unknown event {event!r}; known: {', '.join(EVENT_TYPES)}")
        with self._lock:
            self._listeners.setdefault(event, []).append(fn)
        return fn

    def off(self, event: str, fn: Listener) -> None:
        with self._lock:
            if fn in self._listeners.get(event, []):
                self._listeners[event].remove(fn)

    def emit(self, event: str, **data: Any) -> dict[str, Any]:
        if event not in EVENT_TYPES:
            raise ValueError(f"unknown event {event!r}")
        record = {"event": event, "time": time.time(), **data}
        now = time.monotonic()
        record_it = True
        if event in ("batch_start", "batch_end"):
            last = self._last_throttled.get(event)
            record_it = last is None or now - last >= self._throttle_s
            if record_it:
                self._last_throttled[event] = now
        with self._lock:
            if record_it:
                self._history.append(record)
                if self._path:
                    with self._path.open("a", encoding="utf-8") as fh:
                        fh.write(json.dumps(record, default=str) + "\n")
            listeners = list(self._listeners.get(event, [])) + list(self._listeners.get("*", []))
        for fn in listeners:
            try:
                fn(record)
            except Exception:  # a listener must never break training
                log.exception("event listener %r failed on %s", fn, event)
        return record

    def get_history(self, event: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._history if event is None or r["event"] == event]


def read_events(path: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Events appended to ``path`` since byte ``offset``, and the new offset.

    Only complete lines are consumed, so a reader racing a writer never sees half an event.
    """
    path = Path(path)
    if not path.exists():
        return [], offset
    with path.open("rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    end = chunk.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in chunk[: end + 1].splitlines():
        if line.strip():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("skipping corrupt event line in %s", path)
    return events, offset + end + 1
