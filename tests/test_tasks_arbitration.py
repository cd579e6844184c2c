"""Memory arbitration: the worker's hook around each run (with a recording arbiter of our own), and
``ServingArbiter``'s decision with a real (in-process transformers) ServerManager and the real
``check_fit`` given device figures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from sage_ft.config import TrainConfig
from sage_ft.tasks import TaskManager, TaskStatus
from sage_ft.tasks.arbitration import ServingArbiter
from tests.fixtures_tasks import tiny_task_config


class RecordingArbiter:
    """A stand-in for the serving side that records each call; it can be told to raise."""

    def __init__(self, fail_first: bool):
        self.calls: list[tuple[str, str, bool]] = []
        self.fail_first = fail_first

    def before_run(self, config: TrainConfig) -> str | None:
        started = (Path(config.output_dir) / "events.jsonl").exists()
        self.calls.append(("before", config.output_dir, started))
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("arbiter broke")
        return "chat model paused to free memory for training"

    def after_run(self, config: TrainConfig) -> None:
        meta = json.loads((Path(config.output_dir) / "finetune_meta.json").read_text())
        self.calls.append(("after", config.output_dir, meta["status"] != "running"))
        if self.fail_first and len(self.calls) == 2:
            raise RuntimeError("arbiter broke again")


def test_arbiter_wraps_each_run_and_its_failures_never_stop_the_worker(task_db, task_dataset):
    arbiter = RecordingArbiter(fail_first=True)
    manager = TaskManager(task_db, start_worker=False)
    manager.set_arbiter(arbiter)  # as the app does once its chat server exists
    notes: list[dict] = []
    manager.subscribe(lambda e: notes.append(e) if e["type"] == "arbiter" else None)
    try:
        a = manager.create(tiny_task_config(task_dataset, max_steps=2, save_steps=100))
        b = manager.create(tiny_task_config(task_dataset, max_steps=2, save_steps=100))
        manager.start_worker()
        done = [manager.wait(t.id, 240) for t in (a, b)]
    finally:
        manager.shutdown()
    assert [t.status for t in done] == [TaskStatus.COMPLETED, TaskStatus.COMPLETED]
    # before the run starts (no events yet), after it has ended (meta final), for each task in turn
    assert arbiter.calls == [("before", a.output_dir, False), ("after", a.output_dir, True),
                             ("before", b.output_dir, False), ("after", b.output_dir, True)]
    assert [(n["task_id"], n["hook"]) for n in notes] == [(b.id, "before_run")]  # a's hook raised: no message
    events = [json.loads(line) for line in (Path(b.output_dir) / "events.jsonl").read_text().splitlines()]
    shown = [e for e in events if e["event"] == "log" and e.get("source") == "memory"]
    assert [e["message"] for e in shown] == ["chat model paused to free memory for training"]


@pytest.fixture
def served_demo():
    from sage_ft.serving.manager import ServerManager

    server = ServerManager("demo", backend="transformers", install_exit_handlers=False)
    server.start()
    yield server
    server.close()


def _device_with_ram(available: int) -> dict:
    from sage_ft.gpu import device_info

    info = copy.deepcopy(device_info())
    info["cpu"]["ram_available"] = available
    return info


def test_serving_arbiter_releases_the_chat_server_only_when_the_run_does_not_fit(served_demo, task_dataset):
    from sage_ft.estimate import check_fit

    config, _ = TrainConfig.from_dict(tiny_task_config(task_dataset, devices="cpu"))
    plenty = ServingArbiter(served_demo, lambda c: check_fit(c, device=_device_with_ram(64 * 2**30)))
    assert plenty.before_run(config) is None and served_demo.status()["state"] == "ready"
    plenty.after_run(config)
    assert served_demo.status()["state"] == "ready"

    tight = ServingArbiter(served_demo, lambda c: check_fit(c, device=_device_with_ram(2**20)))
    message = tight.before_run(config)
    assert "paused to free memory for training" in message and "RAM insufficient" in message
    assert served_demo.status()["state"] == "released"
    tight.after_run(config)
    assert served_demo.status()["state"] == "ready" and "back" in tight.last_message

    def unknown(_config):
        raise ValueError("no config.json for model x")

    careful = ServingArbiter(served_demo, unknown)
    assert "could not be estimated" in careful.before_run(config)
    assert served_demo.status()["state"] == "released"
    assert careful.before_run(config) is None  # already released: nothing more to do
    careful.after_run(config)
    assert served_demo.status()["state"] == "ready"
