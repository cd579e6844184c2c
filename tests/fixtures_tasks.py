"""Shared fixtures of the tasks area: a task database per test, tiny datasets and configs, managers.

- ``tiny_task_config(dataset, **overrides)``: a config dict for a run of a few steps on the demo model.
- ``task_dataset``: a small OpenAI-messages jsonl file in the test's tmp dir.
- ``task_db``: a fresh database path; ``idle_manager`` (no worker) / ``worker_manager`` (runs tasks).
- ``spawn_manager_process(db, script)``: a real Python process holding a TaskManager (for kill -9 tests).
- ``write_checkpoint_files(folder, step)``: a small ``checkpoint-N`` folder with every file a resume
  loads, each well formed (for tests of the task store's bookkeeping that never train from it).
- ``wait_for(predicate, timeout, what)``: poll until ``predicate()`` is true (its value), else TimeoutError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sage_ft.tasks import TaskManager
from tests.fixtures_data import memorize_rows, write_jsonl

RUN_TIMEOUT_S = 240


def wait_for(predicate, timeout: float = RUN_TIMEOUT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def tiny_task_config(dataset: str | Path, **overrides: Any) -> dict[str, Any]:
    """A run of 4 optimizer steps on the demo model with a checkpoint every 2 steps."""
    return {"model_name_or_path": "demo", "dataset": str(dataset), "max_steps": 4, "cutoff_len": 64,
            "per_device_train_batch_size": 2, "save_steps": 2, "logging_steps": 1, "learning_rate": 1e-3,
            "packing": False, **overrides}


@pytest.fixture
def task_dataset(tmp_path: Path) -> Path:
    return write_jsonl(memorize_rows() * 2, tmp_path / "task_data.jsonl")


@pytest.fixture
def task_db(tmp_path: Path) -> Path:
    return tmp_path / "tasks.db"


@pytest.fixture
def idle_manager(task_db: Path) -> Iterator[TaskManager]:
    manager = TaskManager(task_db, start_worker=False)
    yield manager
    manager.shutdown()


@pytest.fixture
def worker_manager(task_db: Path) -> Iterator[TaskManager]:
    manager = TaskManager(task_db, start_worker=True)
    yield manager
    manager.shutdown(timeout=60)


def spawn_manager_process(db: Path, body: str, log_path: Path) -> subprocess.Popen:
    """A real process that opens ``TaskManager(db)`` as ``manager`` and runs ``body`` (Python code)."""
    script = textwrap.dedent("""
        import sys, time
        from sage_ft.tasks import TaskManager
        manager = TaskManager(sys.argv[1])
    """) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    return subprocess.Popen([sys.executable, "-c", script, str(db)], env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def write_checkpoint_files(folder: Path, step: int) -> Path:
    """Every file ``checkpoints.checkpoint_problem`` looks at, well formed and tiny (not trainable)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (folder / "adapter_config.json").write_text("{}")
    save_file({"lora_A": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"step": step}, folder / name)
    return folder
