"""Live state of a run, shared between the training thread and whoever asks (UI, task manager).

The training loop only ever touches these objects between optimizer steps, so cancel/pause cost a
flag check per step and never interrupt a step half-way (the adapter stays consistent).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class RunState:
    """What ``FineTuneRun.get_current_state()`` returns (as a dict)."""

    status: str = "pending"  # pending, running, paused, completed, failed, cancelled
    is_training: bool = False
    current_epoch: float = 0.0
    total_epochs: float = 0.0
    current_step: int = 0
    total_steps: int = 0
    current_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    padding_fraction: float | None = None
    started_at: float | None = None
    error: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, **values: Any) -> None:
        with self._lock:
            for key, value in values.items():
                setattr(self, key, value)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            data = {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
        if data["started_at"] is not None:
            data["elapsed_seconds"] = time.time() - data["started_at"]
        return data


class RunControl:
    """Cancel and pause flags, set from any thread, obeyed by the training loop between steps."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self.paused_seconds = 0.0  # time held by wait_while_paused: left out of tokens/s and the ETA

    def cancel(self) -> None:
        self._cancel.set()
        self._running.set()  # a paused run must wake up to stop

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wait_while_paused(self, poll_s: float = 0.5) -> None:
        start = time.monotonic()
        while not self._running.wait(poll_s):
            pass
        self.paused_seconds += time.monotonic() - start
