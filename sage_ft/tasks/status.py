"""Task lifecycle states and the icons every client (web UI, CLI) shows for them.

queued -> running -> completed | failed | cancelled; a run whose process died becomes
interrupted, which (like failed and cancelled) can be resumed from its last checkpoint.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def icon(self) -> str:
        return _ICONS[self]

    @property
    def label(self) -> str:
        """Icon and word, e.g. '🔄 running' (what the task list shows)."""
        return f"{self.icon} {self.value}"

    @property
    def is_final(self) -> bool:
        """The run is over (nothing in this state will change by itself)."""
        return self in FINAL_STATES

    @property
    def is_resumable(self) -> bool:
        """A run in this state may continue from its last checkpoint."""
        return self in RESUMABLE_STATES

    @property
    def is_cancellable(self) -> bool:
        """A task in this state can be cancelled (a running one stops at its next step)."""
        return self in CANCELLABLE_STATES


_ICONS = {
    TaskStatus.COMPLETED: "✅",
    TaskStatus.RUNNING: "🔄",
    TaskStatus.QUEUED: "⏳",
    TaskStatus.FAILED: "❌",
    TaskStatus.CANCELLED: "⏹",
    TaskStatus.INTERRUPTED: "⚠️",
}

FINAL_STATES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.INTERRUPTED})
RESUMABLE_STATES = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.INTERRUPTED})
# What ``TaskManager.cancel`` accepts. Queued (leaves the queue) and interrupted (stays resumable) become
# cancelled at once; a running task is asked to stop at its next step and becomes cancelled when it has.
CANCELLED_AT_ONCE_STATES = frozenset({TaskStatus.QUEUED, TaskStatus.INTERRUPTED})
CANCELLABLE_STATES = CANCELLED_AT_ONCE_STATES | {TaskStatus.RUNNING}
