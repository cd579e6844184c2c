"""Tasks where a command expects a model or a run: a task id (``7`` or ``#7``, as ``sage-ft tasks list``
and the web UI show them) or a task's name stands for that task's run directory (``sage-ft switch 7``,
``sage-ft switch my-run``, ``sage-ft export 7``)."""

from __future__ import annotations

import re
from pathlib import Path

from sage_ft import paths

_TASK_ID = re.compile(r"#?(\d+)")


def parse_task_id(text: str | int) -> int | None:
    """The id ``text`` writes as ``7`` or ``#7``; None when it writes no task id."""
    match = _TASK_ID.fullmatch(str(text).strip())
    return int(match.group(1)) if match else None


def task_run_dir(text: str | int | Path) -> Path | None:
    """The run directory of the task ``text`` names by id or by name; None when it names no task or
    names something else first: an existing path (a folder named ``7`` wins), the demo model, or a
    model or run folder of the data home. Raises ``TaskNotFound`` for an id the store does not have,
    ``AmbiguousTaskName`` (a TaskNotFound) for a name several tasks carry."""
    from sage_ft.models.demo import DEMO_NAME

    value = str(text).strip()
    if not value or Path(value).expanduser().exists():
        return None
    task_id = parse_task_id(value)
    if task_id is None and (value == DEMO_NAME or any((d / value).exists() for d in (paths.models_dir(),
                                                                                      paths.runs_dir()))):
        return None
    from sage_ft.tasks.manager import TaskManager
    from sage_ft.tasks.task import AmbiguousTaskName

    manager = TaskManager(start_worker=False)
    try:
        if task_id is not None:
            return Path(manager.task(task_id).output_dir)
        named = [task for task in manager.list() if task.name == value]
    finally:
        manager.shutdown()
    if len(named) > 1:
        raise AmbiguousTaskName(value, sorted(task.id for task in named))
    return Path(named[0].output_dir) if named else None
