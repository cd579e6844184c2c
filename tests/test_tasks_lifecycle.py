"""Task lifecycle without training: validation on create, queue, cancel, delete, recovery after a
dead process (real processes killed with SIGKILL), clone/retry, polling, concurrent clients."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sage_ft import paths
from sage_ft.tasks import TaskError, TaskManager, TaskNotFound, TaskRefused, TaskStatus
from sage_ft.tasks.procinfo import ProcessIdentity, current_identity, identity_of
from sage_ft.tasks.task import TaskStateError
from sage_ft.tasks.worker import LOCAL_RUNS, LOCAL_RUNS_LOCK, claim_next
from tests.fixtures_data import memorize_rows, write_jsonl
from tests.fixtures_tasks import tiny_task_config, write_checkpoint_files


def _sleeper(seconds: int = 120) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])


def _run_dirs() -> set[str]:
    return {p.name for p in paths.runs_dir().iterdir()}


# ------------------------------------------------------------------------------ create
@pytest.mark.parametrize("change, expected", [
    ({"learning_rate": -1, "per_device_train_batch_size": 0}, ["learning_rate", "per_device_train_batch_size"]),
    ({"dataset": ""}, ["dataset: empty"]),
    ({"dataset": "/nonexistent/data.jsonl"}, ["/nonexistent/data.jsonl"]),
    ({"model_name_or_path": "/nonexistent/model"}, ["model directory /nonexistent/model does not exist"]),
    ({"lr_scheduler_type": "sawtooth"}, ["lr_scheduler_type: 'sawtooth' is not allowed"]),
    # 8 rows: it was queued, then failed once the model had loaded
    ({"val_size": 25}, ["val_size: 25 holds out 25 of the 8 usable rows", "leaving none to train on"]),
    ({"val_size": 8}, ["val_size: 8 holds out 8 of the 8 usable rows"]),
])
def test_create_refuses_bad_input_and_writes_nothing(idle_manager, task_dataset, change, expected):
    before = _run_dirs()
    with pytest.raises(TaskRefused) as info:
        idle_manager.create({**tiny_task_config(task_dataset), **change})
    for text in expected:
        assert any(text in p for p in info.value.problems), info.value.problems
    assert idle_manager.list() == [] and _run_dirs() == before


def test_a_quantized_run_without_bitsandbytes_is_refused_with_what_to_install(idle_manager, task_dataset,
                                                                             monkeypatch):
    """Where bitsandbytes is not installed (it is hidden here, as an absent package is: ``None`` in
    ``sys.modules``), a 4-bit run is refused when queued, saying what to install, not after loading."""
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(TaskRefused, match=r"quantization_bit: 4 needs bitsandbytes, which is not installed; "
                                          r"install it \(pip install 'bitsandbytes>=0.50'"):
        idle_manager.create({**tiny_task_config(task_dataset), "quantization_bit": 4})
    assert idle_manager.list() == []


def test_create_refuses_broken_dataset_with_its_line(idle_manager, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [ this is not json\n')
    with pytest.raises(TaskRefused, match="line 2"):
        idle_manager.create(tiny_task_config(bad))
    assert idle_manager.list() == []


def test_create_refuses_eval_data_it_cannot_use(idle_manager, task_dataset, tmp_path):
    """eval_dataset is checked before anything is queued, as dataset is, and named in each problem."""
    bad = tmp_path / "dev.jsonl"
    bad.write_text('{"messages": [ this is not json\n')
    train_only = tmp_path / "train-only"
    write_jsonl(memorize_rows(), train_only / "train.jsonl")
    for change, expected in [
        ({"eval_dataset": str(bad)}, "eval_dataset: " + str(bad) + ": line 1"),
        ({"eval_dataset": str(train_only)}, f"eval_dataset: {train_only}: no eval split in it"),
        ({"eval_dataset": str(tmp_path / "nowhere.jsonl")}, "eval_dataset: " + str(tmp_path / "nowhere.jsonl")),
        ({"eval_dataset": str(task_dataset), "val_size": 0.25}, "val_size: 0.25 holds rows of dataset out"),
    ]:
        with pytest.raises(TaskRefused) as info:
            idle_manager.create({**tiny_task_config(task_dataset), **change})
        assert any(p.startswith(expected) for p in info.value.problems), (change, info.value.problems)
    assert idle_manager.list() == []


def test_create_refuses_a_non_empty_output_dir(idle_manager, task_dataset, tmp_path):
    out = tmp_path / "used"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TaskRefused, match="exists and is not empty"):
        idle_manager.create(tiny_task_config(task_dataset, output_dir=str(out)))
    assert (out / "keep.txt").read_text() == "mine" and idle_manager.list() == []


def test_create_freezes_the_config(idle_manager, task_dataset, monkeypatch, tmp_path):
    monkeypatch.chdir(task_dataset.parent)
    config = tiny_task_config(task_dataset.name, max_steps=5)  # a relative path, as typed
    task = idle_manager.create(config, name="frozen", source="cli")
    config["max_steps"] = 99  # the caller's dict changing later must not matter
    frozen = yaml.safe_load(idle_manager.task(task.id).config_yaml)
    assert frozen["max_steps"] == 5
    assert frozen["dataset"] == str(task_dataset.resolve())  # absolute: the worker's cwd may differ
    assert frozen["output_dir"] == task.output_dir
    assert Path(task.output_dir).parent == paths.runs_dir() and not Path(task.output_dir).exists()
    assert (task.status, task.source, task.name, len(task.dataset_fingerprint)) == (
        TaskStatus.QUEUED, "cli", "frozen", 64)


# ------------------------------------------------------------------------------ queue, cancel, delete
def test_queue_positions_and_cancel_of_queued_tasks(idle_manager, task_dataset):
    a, b, c = (idle_manager.create(tiny_task_config(task_dataset), name=n) for n in "abc")
    assert [t.id for t in idle_manager.queue()] == [a.id, b.id, c.id]
    assert [idle_manager.get(t.id).queue_position for t in (a, b, c)] == [1, 2, 3]

    cancelled = idle_manager.cancel(b.id)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.finished_at
    assert [t.id for t in idle_manager.queue()] == [a.id, c.id]
    assert idle_manager.get(c.id).queue_position == 2
    with pytest.raises(TaskError, match=f"task {b.id} is already cancelled"):
        idle_manager.cancel(b.id)


def test_delete_rules(idle_manager, task_dataset, tmp_path):
    queued = idle_manager.create(tiny_task_config(task_dataset), name="queued")
    running = idle_manager.create(tiny_task_config(task_dataset), name="running")
    idle_manager.delete(queued.id)  # a queued task may go: it just leaves the queue
    assert claim_next(idle_manager.store, current_identity()) == running.id
    try:
        with pytest.raises(TaskError, match=f"task {running.id} is running; cancel it first"):
            idle_manager.delete(running.id)
        assert idle_manager.task(running.id).status is TaskStatus.RUNNING
    finally:
        with LOCAL_RUNS_LOCK:
            LOCAL_RUNS.discard(running.id)

    foreign = tmp_path / "not-a-run"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("x")
    other = idle_manager.create(tiny_task_config(task_dataset, output_dir=str(tmp_path / "new-out")))
    idle_manager.cancel(other.id)
    idle_manager.delete(other.id, remove_files=True)  # nothing on disk yet: fine
    assert [t.id for t in idle_manager.list()] == [running.id]
    with pytest.raises(TaskNotFound, match=f"no task with id {other.id}"):
        idle_manager.get(other.id)
    assert (foreign / "precious.txt").exists()


def test_pause_rules(idle_manager, task_dataset):
    queued = idle_manager.create(tiny_task_config(task_dataset))
    with pytest.raises(TaskError, match=f"task {queued.id} is queued; only a running task can be paused"):
        idle_manager.pause(queued.id)
    with pytest.raises(TaskError, match="only a running task can be unpaused"):
        idle_manager.unpause(queued.id)
    idle_manager.cancel(queued.id)
    multi = idle_manager.create(tiny_task_config(task_dataset, num_processes=2, devices="cpu"))
    assert claim_next(idle_manager.store, current_identity()) == multi.id
    try:
        with pytest.raises(TaskError, match="multi-process run, which cannot be paused"):
            idle_manager.pause(multi.id)
        assert idle_manager.task(multi.id).paused is False
    finally:
        with LOCAL_RUNS_LOCK:
            LOCAL_RUNS.discard(multi.id)


def test_unknown_ids_raise_task_not_found(idle_manager):
    for op in (idle_manager.get, idle_manager.cancel, idle_manager.delete, idle_manager.resume,
               idle_manager.retry, idle_manager.clone, idle_manager.pause, idle_manager.unpause):
        with pytest.raises(TaskNotFound, match="no task with id 4242"):
            op(4242)


# ------------------------------------------------------------------------------ recovery
def _run_by_a_killed_process(manager: TaskManager, task_id: int, while_alive: Callable[[], None]) -> int:
    """``task_id`` claimed by another process, ``while_alive()``, then that process kill -9'd; its pid."""
    owner = _sleeper()
    try:
        assert claim_next(manager.store, identity_of(owner.pid)) == task_id
        while_alive()
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
    finally:
        owner.kill()
    return owner.pid


def test_task_of_a_killed_process_becomes_interrupted(idle_manager, task_dataset):
    task = idle_manager.create(tiny_task_config(task_dataset))

    def left_alone_while_alive() -> None:
        assert idle_manager.recover() == []
        assert idle_manager.task(task.id).status is TaskStatus.RUNNING

    pid = _run_by_a_killed_process(idle_manager, task.id, left_alone_while_alive)
    assert idle_manager.recover() == [task.id]
    got = idle_manager.task(task.id)
    assert got.status is TaskStatus.INTERRUPTED and got.icon == "⚠️"
    assert f"process {pid} stopped" in got.error and "no checkpoint" in got.error
    with pytest.raises(TaskStateError, match="no checkpoint .* use retry") as refused:
        idle_manager.resume(task.id)
    assert refused.value.reason == "no_checkpoint"  # the web UI words its own hint from it
    assert idle_manager.recover() == []  # idempotent


def test_an_interrupted_task_shows_the_step_its_last_checkpoint_saved(idle_manager, task_dataset):
    """Progress reaches the database every few seconds, a checkpoint reaches the disk when it is done:
    after a kill the task shows the step it resumes from, not an older progress write (136/3000 next
    to "resume continues from checkpoint-140" before)."""
    task = idle_manager.create(tiny_task_config(task_dataset))

    def train_to_step_8() -> None:
        with sqlite3.connect(idle_manager.store.path) as db:  # the last progress write before the kill
            db.execute("UPDATE tasks SET step = 3, total_steps = 12 WHERE id = ?", (task.id,))
        for step in (4, 8):
            write_checkpoint_files(Path(task.output_dir) / f"checkpoint-{step}", step)

    _run_by_a_killed_process(idle_manager, task.id, train_to_step_8)
    assert idle_manager.recover() == [task.id]
    got = idle_manager.task(task.id)
    assert (got.status, got.step, got.total_steps) == (TaskStatus.INTERRUPTED, 8, 12)
    assert Path(got.resume_checkpoint).name == "checkpoint-8" and "checkpoint-8" in got.error


def test_previous_incarnation_with_the_same_pid_is_detected(idle_manager, task_dataset):
    """After a container restart the app often gets its old pid back: the start time tells them apart."""
    task = idle_manager.create(tiny_task_config(task_dataset))
    me = current_identity()
    assert claim_next(idle_manager.store, ProcessIdentity(me.pid, me.start_time - 3600)) == task.id
    with LOCAL_RUNS_LOCK:
        LOCAL_RUNS.discard(task.id)
    assert TaskManager(idle_manager.store.path, start_worker=False).recover() == []  # done on open already
    assert idle_manager.task(task.id).status is TaskStatus.INTERRUPTED


def test_orphaned_worker_child_is_ended_by_identity(idle_manager, task_dataset):
    task = idle_manager.create(tiny_task_config(task_dataset))
    owner, child, bystander = _sleeper(), _sleeper(), _sleeper()
    try:
        claim_next(idle_manager.store, identity_of(owner.pid))
        child_id = identity_of(child.pid)
        with sqlite3_conn(idle_manager) as conn:
            conn.execute("UPDATE tasks SET child_pid=?, child_start_time=? WHERE id=?",
                         (child_id.pid, child_id.start_time, task.id))
        owner.kill()
        owner.wait(10)
        assert idle_manager.recover() == [task.id]
        child.wait(10)  # returns: it was ended (psutil reaped it, so the exit code is not ours to read)
        assert not child_id.is_alive()
        assert bystander.poll() is None  # an unrelated process is never touched
        assert idle_manager.task(task.id).status is TaskStatus.INTERRUPTED
    finally:
        for proc in (owner, child, bystander):
            proc.kill()
            proc.wait(10)


def sqlite3_conn(manager: TaskManager):
    import sqlite3

    return sqlite3.connect(manager.store.path)


# ------------------------------------------------------------------------------ retry, clone, poll
def test_retry_and_clone_start_from_the_frozen_config(idle_manager, task_dataset):
    task = idle_manager.create(tiny_task_config(task_dataset, lora_rank=4), name="base")
    with pytest.raises(TaskError, match="retry is for failed, cancelled or interrupted"):
        idle_manager.retry(task.id)
    idle_manager.cancel(task.id)
    retried = idle_manager.retry(task.id)
    assert (retried.status, retried.parent_id, retried.name) == (TaskStatus.QUEUED, task.id, "base")
    assert retried.output_dir != task.output_dir
    assert retried.config_dict == {**task.config_dict, "output_dir": retried.output_dir}

    clone = idle_manager.clone(task.id, overrides={"lora_rank": 16})
    assert clone.config_dict["lora_rank"] == 16 and clone.name == "base (copy)"
    with pytest.raises(TaskRefused, match="lora_rank"):
        idle_manager.clone(task.id, overrides={"lora_rank": 0})
    assert idle_manager.task(task.id).config_dict["lora_rank"] == 4  # the original never changes


def test_poll_reports_changes_only(idle_manager, task_dataset):
    version, tasks = idle_manager.poll()
    assert tasks == []
    assert idle_manager.poll(version) == (version, None)
    task = idle_manager.create(tiny_task_config(task_dataset))
    version2, tasks = idle_manager.poll(version)
    assert version2 != version and [t.id for t in tasks] == [task.id]
    other = TaskManager(idle_manager.store.path, start_worker=False)  # another process's change counts too
    other.cancel(task.id)
    other.shutdown()
    version3, tasks = idle_manager.poll(version2)
    assert version3 != version2 and tasks[0].status is TaskStatus.CANCELLED
    assert json.dumps([t.to_dict() for t in tasks])  # JSON-ready for the UI and --json


def test_two_clients_creating_and_cancelling_at_once_lose_nothing(task_db, task_dataset):
    """Two 'browsers' (managers with their own connections) hammer the store concurrently."""
    TaskManager(task_db, start_worker=False).shutdown()
    created: dict[str, list[int]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def client(key: str) -> None:
        manager = TaskManager(task_db, start_worker=False)
        try:
            for i in range(10):
                task = manager.create(tiny_task_config(task_dataset), name=f"{key}{i}")
                created[key].append(task.id)
                if i % 2:  # cancel its own task and the other client's newest (either may be cancelled already)
                    other = created["b" if key == "a" else "a"]
                    for victim in [task.id] + other[-1:]:
                        try:
                            manager.cancel(victim)
                        except TaskError as exc:
                            assert "already cancelled" in str(exc)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            manager.shutdown()

    threads = [threading.Thread(target=client, args=(k,)) for k in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    manager = TaskManager(task_db, start_worker=False)
    try:
        tasks = manager.list()
        ids = created["a"] + created["b"]
        assert sorted(t.id for t in tasks) == sorted(ids) and len(set(ids)) == 20
        assert {t.status for t in tasks} <= {TaskStatus.QUEUED, TaskStatus.CANCELLED}
        positions = [t.position for t in tasks]
        assert len(set(positions)) == len(positions)  # a strict queue order
        assert manager.store.integrity_check() == "ok"
    finally:
        manager.shutdown()


def test_workers_are_listed_while_alive(task_db):
    manager = TaskManager(task_db, start_worker=True)
    try:
        deadline = time.monotonic() + 10
        while not manager.workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [w["pid"] for w in manager.workers()] == [current_identity().pid]
    finally:
        manager.shutdown()
    assert TaskManager(task_db, start_worker=False).workers() == []
