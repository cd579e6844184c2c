"""Immutable snapshots of tasks handed to clients (UI, CLI, tests); never live database rows."""

from __future__ import annotations

import copy
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

from sage_ft.config import TrainConfig
from sage_ft.events import Preparation
from sage_ft.tasks.status import TaskStatus
from sage_ft.tasks.store import TaskRecord

PREPARING_KEYS = ("preparing", "preparing_done", "preparing_total")  # a Preparation in the row's metrics


def preparation_metrics(preparation: Preparation | None) -> dict[str, Any]:
    """How the row's ``last_metrics`` hold a running task's ``Preparation`` (all None: it trains)."""
    return dict(zip(PREPARING_KEYS, preparation or (None, None, None), strict=True))


class TaskError(ValueError):
    """An operation that cannot be done on a task; the message says why and what to do instead."""


class TaskStateError(TaskError):
    """``action`` refused for task ``task_id`` by its state; ``reason`` names the rule ("running",
    "no_checkpoint", "state", "multi_process"). The message is the CLI's sentence, whose hint is a
    command; a client with other means (the web UI's buttons) words its own hint from these fields."""

    def __init__(self, message: str, *, task_id: int, action: str, status: str, reason: str):
        super().__init__(message)
        self.task_id, self.action, self.status, self.reason = task_id, action, status, reason


class TaskNotFound(TaskError, LookupError):
    def __init__(self, task_id: int):
        self.task_id = task_id
        super().__init__(f"no task with id {task_id} (see `sage-ft tasks list`)")


class AmbiguousTaskName(TaskNotFound):
    """A task name that several tasks carry: no one run is meant (callers that catch TaskNotFound say so)."""

    def __init__(self, name: str, task_ids: list[int]):
        TaskError.__init__(self, f"{len(task_ids)} tasks are named {name!r} (" + ", ".join(f"#{i}" for i in task_ids)
                           + "); give the task id instead")
        self.task_id, self.task_ids = None, task_ids


class TaskRefused(TaskError):
    """``create`` refused a task before queuing it; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Task not created:\n  - " + "\n  - ".join(problems))


@dataclass(frozen=True)
class Task:
    id: int
    name: str
    status: TaskStatus
    source: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float
    config_yaml: str
    dataset: str
    dataset_fingerprint: str
    output_dir: str
    step: int
    total_steps: int
    last_metrics: dict[str, Any]
    error: str | None
    pid: int | None
    resume_checkpoint: str | None
    position: int
    parent_id: int | None
    attempts: int
    cancel_requested: bool
    paused: bool  # a running task held between two steps (status stays running); see TaskManager.pause
    active_seconds: float  # time trained in earlier stretches (attempts, between pauses)
    active_since: float | None  # start of the stretch now counting; None unless running and not paused

    @classmethod
    def from_record(cls, rec: TaskRecord) -> Task:
        return cls(
            id=rec.id, name=rec.name, status=TaskStatus(rec.status), source=rec.source,
            created_at=rec.created_at, started_at=rec.started_at, finished_at=rec.finished_at,
            updated_at=rec.updated_at, config_yaml=rec.config_yaml, dataset=rec.dataset,
            dataset_fingerprint=rec.dataset_fingerprint, output_dir=rec.output_dir, step=rec.step,
            total_steps=rec.total_steps, last_metrics=json.loads(rec.last_metrics or "{}"), error=rec.error,
            pid=rec.pid, resume_checkpoint=rec.resume_checkpoint, position=rec.position,
            parent_id=rec.parent_id, attempts=rec.attempts, cancel_requested=bool(rec.cancel_requested),
            paused=bool(rec.paused), active_seconds=float(rec.active_seconds or 0.0), active_since=rec.active_since)

    @property
    def icon(self) -> str:
        return self.status.icon

    @property
    def config_dict(self) -> dict[str, Any]:
        """The frozen config exactly as queued (plain values; a copy the caller may change)."""
        return copy.deepcopy(_parse_config(self.config_yaml))

    @property
    def config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.config_dict)[0]

    @property
    def progress(self) -> float:
        """0..1 from steps (1.0 for a completed task)."""
        if self.status is TaskStatus.COMPLETED:
            return 1.0
        return min(1.0, self.step / self.total_steps) if self.total_steps else 0.0

    @property
    def preparation(self) -> Preparation | None:
        """What a running task does before its first step (reading data, tokenizing, loading the
        model), from its row; None once it trains (and for any other status)."""
        if self.status is not TaskStatus.RUNNING:
            return None
        return Preparation.from_fields(*(self.last_metrics.get(key) for key in PREPARING_KEYS))

    @property
    def duration_s(self) -> float | None:
        """Time spent training: every attempt of a resumed task, without pauses or the time between
        attempts (``started_at`` stays the first start); None before the first start."""
        if self.started_at is None:
            return None
        current = max(0.0, time.time() - self.active_since) if self.active_since is not None else 0.0
        return self.active_seconds + current

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``sage-ft tasks list --json``)."""
        data = asdict(self)
        data["status"] = self.status.value
        data["icon"] = self.icon
        data["progress"] = round(self.progress, 4)
        return data


@dataclass(frozen=True)
class TaskDetail(Task):
    """A task with what its run directory holds (``TaskManager.get``)."""

    metrics_history: list[dict[str, Any]] = field(default_factory=list)
    log_tail: str = ""
    checkpoints: list[str] = field(default_factory=list)  # the intact ones, which a resume can use
    damaged_checkpoints: dict[str, str] = field(default_factory=dict)  # folder -> what is wrong with it
    queue_position: int | None = None  # 1 = next to start
    estimated_start: float | None = None  # unix time; None when unknown
    eta_seconds: float | None = None  # remaining time of a running task

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["config"] = self.config_dict
        return data


@functools.lru_cache(maxsize=1024)
def _parse_config(text: str) -> dict[str, Any]:
    """A queued config is never edited, and the task table shows every task's model and dataset on
    each page tick: parse each text once (pure-Python YAML takes ~6 ms per config)."""
    return yaml.safe_load(text) or {}
