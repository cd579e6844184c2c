"""The persistent task store and sequential queue shared by the web UI, the CLI and the tests.

``TaskManager`` is the whole public API; ``Task``/``TaskDetail`` are the snapshots it returns.
"""

from sage_ft.tasks.lookup import parse_task_id, task_run_dir
from sage_ft.tasks.manager import ForegroundResult, TaskManager
from sage_ft.tasks.status import TaskStatus
from sage_ft.tasks.store import StoreUnavailable
from sage_ft.tasks.task import AmbiguousTaskName, Task, TaskDetail, TaskError, TaskNotFound, TaskRefused

__all__ = ["AmbiguousTaskName", "ForegroundResult", "StoreUnavailable", "Task", "TaskDetail", "TaskError", "TaskManager", "TaskNotFound", "TaskRefused",
           "TaskStatus", "parse_task_id", "task_run_dir"]
