"""Task ids where a command expects a model or a run: ``7`` or ``#7``, as ``sage-ft tasks list`` and the
web UI show them, stand for that task's run directory (``sage-ft switch 7``, ``sage-ft export 7``)."""

from __future__ import annotations

import re
from pathlib import Path

_TASK_ID = re.compile(r"#?(\d+)")


def parse_task_id(text: str | int) -> int | None:
    """The id ``text`` writes as ``7`` or ``#7``; None when it writes no task id."""
    match = _TASK_ID.fullmatch(str(text).strip())
    return int(match.group(1)) if match else None


def task_run_dir(text: str | int | Path) -> Path | None:
    """The run directory of the task ``text`` names; None when ``text`` is no task id or is an existing
    path (a folder named ``7`` wins). Raises ``TaskNotFound`` for an id the store does not have."""
    value = str(text).strip()
    task_id = parse_task_id(value)
    if task_id is None or Path(value).expanduser().exists():
        return None
    from sage_ft.tasks.manager import TaskManager

    manager = TaskManager(start_worker=False)
    try:
        return Path(manager.task(task_id).output_dir)
    finally:
        manager.shutdown()
