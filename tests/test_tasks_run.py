"""Tasks running real training on the demo model: queue, failures, cancel, resume, kill -9 of the
app mid-run, two app processes on one database, CLI-style foreground runs, memory release."""

from __future__ import annotations

import gc
import json
import re
import shutil
import signal
import sqlite3
import threading
import time
import zipfile
from pathlib import Path

import psutil
import pytest

from sage_ft.models.demo import ensure_demo_model
from sage_ft.tasks import TaskError, TaskManager, TaskStatus
from sage_ft.tasks.procinfo import ProcessIdentity
from sage_ft.training.meta import read_meta
from sage_ft.webui import render
from tests.fixtures_data import write_jsonl
from tests.fixtures_tasks import RUN_TIMEOUT_S, spawn_manager_process, tiny_task_config, wait_for


def _events(task) -> list[dict]:
    return [json.loads(line) for line in (Path(task.output_dir) / "events.jsonl").read_text().splitlines()]


def _training_starts(task) -> list[dict]:
    return [e for e in _events(task) if e["event"] == "training_start"]


def _large_dataset(folder: Path) -> Path:
    """40,000 short conversations: tokenizing them takes seconds, so a run is seen (and cancelled) while
    it prepares."""
    rows = [{"messages": [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
                          {"role": "assistant", "content": f"It is {2 * i}, twice {i}."}]} for i in range(40_000)]
    return write_jsonl(rows, folder / "large.jsonl")


def test_queue_runs_in_order_and_failures_do_not_block_it(idle_manager, task_dataset, tmp_path):
    doomed_data = shutil.copy(task_dataset, tmp_path / "doomed.jsonl")
    broken_model = shutil.copytree(ensure_demo_model(), tmp_path / "model-copy")
    events: list[dict] = []
    idle_manager.subscribe(events.append)
    a = idle_manager.create(tiny_task_config(doomed_data), name="dataset deleted after queuing")
    b = idle_manager.create(tiny_task_config(task_dataset, model_name_or_path=str(broken_model)), name="weights gone")
    c = idle_manager.create(tiny_task_config(task_dataset), name="good")
    Path(doomed_data).unlink()
    for weights in Path(broken_model).glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")

    idle_manager.start_worker()
    done = [idle_manager.wait(t.id, RUN_TIMEOUT_S) for t in (a, b, c)]
    assert [t.status for t in done] == [TaskStatus.FAILED, TaskStatus.FAILED, TaskStatus.COMPLETED]
    assert "no longer exists" in done[0].error and str(doomed_data) in done[0].error
    assert done[1].error and "❌" == done[1].icon
    assert done[0].started_at <= done[1].started_at <= done[2].started_at  # queue order
    assert (done[2].step, done[2].total_steps, done[2].progress) == (4, 4, 1.0)
    assert isinstance(done[2].last_metrics["loss"], float)
    statuses = [(e["task_id"], e["status"]) for e in events if e["type"] == "status"]
    assert (c.id, "running") in statuses and statuses[-1] == (c.id, "completed")

    detail = idle_manager.get(c.id)
    assert [m["step"] for m in detail.metrics_history if "loss" in m] == [1, 2, 3, 4]
    assert [Path(p).name for p in detail.checkpoints] == ["checkpoint-2", "checkpoint-4"]
    assert "completed" in detail.log_tail
    failed_detail = idle_manager.get(b.id)
    assert failed_detail.log_tail  # the failure's log is there to read

    # with a finished run in the history, a queued task gets an estimated start time
    later = idle_manager.create(tiny_task_config(task_dataset), name="later")
    idle_manager.shutdown()  # stop the worker so `later` stays queued for the check
    manager = TaskManager(idle_manager.store.path, start_worker=False)
    detail = manager.get(later.id)
    assert detail.queue_position == 1 and detail.estimated_start is not None
    manager.shutdown()


def test_download_and_compare(worker_manager, task_dataset):
    a = worker_manager.create(tiny_task_config(task_dataset, learning_rate=1e-3))
    b = worker_manager.create(tiny_task_config(task_dataset, learning_rate=5e-4))
    for t in (a, b):
        assert worker_manager.wait(t.id, RUN_TIMEOUT_S).status is TaskStatus.COMPLETED
    archive = worker_manager.download(a.id, "lora")
    names = zipfile.ZipFile(archive).namelist()
    assert "lora/adapter_config.json" in names and "finetune_meta.json" in names and "config.yaml" in names
    with pytest.raises(TaskError, match="no merged_model/"):
        worker_manager.download(a.id, "merged")
    report = worker_manager.compare([a.id, b.id])
    assert report["config_diff"] == {"learning_rate": {a.id: 1e-3, b.id: 5e-4}}
    assert [len(report["curves"][t.id]["loss"]) for t in (a, b)] == [4, 4]
    assert [t["status"] for t in report["tasks"]] == ["completed", "completed"]


def test_cancel_running_keeps_adapter_and_resume_finishes_with_the_same_steps(worker_manager, task_dataset):
    task = worker_manager.create(tiny_task_config(task_dataset, max_steps=12, save_steps=2))

    def cancel_after_first_checkpoint(event: dict) -> None:  # runs on the training thread, at once
        if event.get("task_id") == task.id and event.get("event") == "checkpoint_saved":
            unsubscribe()
            worker_manager.cancel(task.id)

    unsubscribe = worker_manager.subscribe(cancel_after_first_checkpoint)
    cancelled = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.step < 12  # stopped within a step
    assert (Path(task.output_dir) / "lora" / "adapter_config.json").exists()  # adapter kept
    assert cancelled.resume_checkpoint and Path(cancelled.resume_checkpoint).is_dir()

    resumed = worker_manager.resume(task.id)
    assert (resumed.status, resumed.attempts) == (TaskStatus.QUEUED, 2)
    finished = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert (finished.status, finished.step, finished.total_steps) == (TaskStatus.COMPLETED, 12, 12)
    starts = _training_starts(finished)
    assert [s["start_step"] for s in starts] == [0, int(Path(cancelled.resume_checkpoint).name.split("-")[1])]
    assert finished.output_dir == task.output_dir


def test_a_large_dataset_shows_its_preparation_and_a_cancel_there_stops_it_before_any_step(worker_manager,
                                                                                          tmp_path):
    """Tokenizing 40,000 conversations takes seconds: the task's row says how far it got (every
    client shows "preparing: tokenizing 12,288/40,000" rather than "step 0/?"), and a cancel then
    ends the run mid-tokenization: no step, no adapter, and the row keeps no preparing state."""
    task = worker_manager.create(tiny_task_config(_large_dataset(tmp_path)))
    tokenizing = wait_for(lambda: (live := worker_manager.task(task.id)).last_metrics.get("preparing_done")
                          and live, what="tokenizing progress in the task's row")
    prep = tokenizing.preparation
    assert prep.phase == "tokenize" and 0 < prep.done < prep.total == 40_000
    assert prep.text == f"preparing: tokenizing {prep.done:,}/40,000 conversations ({prep.percent}%)"  # the CLI's line
    shown = render.progress_html(tokenizing, "en")
    assert "preparing: tokenizing" in shown and "/40,000 conversations" in shown and "step 0/?" not in shown
    assert "before its first training step" in render.cancel_message(worker_manager.cancel(task.id), "en")

    cancelled = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert (cancelled.status, cancelled.step, cancelled.error) == (TaskStatus.CANCELLED, 0, None)
    assert not any(key.startswith("preparing") for key in cancelled.last_metrics)
    events = _events(cancelled)
    assert not [e for e in events if e["event"] == "training_start"]
    last_report = [e for e in events if e["event"] == "preparing"][-1]
    assert last_report["phase"] == "tokenize" and last_report["done"] < 40_000  # stopped mid-way
    assert not (Path(task.output_dir) / "lora").exists() and cancelled.resume_checkpoint is None
    assert read_meta(task.output_dir)["status"] == "cancelled"


def test_a_resumed_task_cancelled_while_preparing_keeps_its_earlier_checkpoints(worker_manager, tmp_path):
    """A resumed attempt prepares again (tokenizing 40,000 conversations takes seconds). A cancel then
    trains nothing more, but the checkpoints of the first attempt stay, and the message says so rather
    than "nothing was trained"; the task can still be resumed from them."""
    task = worker_manager.create(tiny_task_config(_large_dataset(tmp_path), max_steps=400, save_steps=1))

    def cancel_after_first_checkpoint(event: dict) -> None:
        if event.get("task_id") == task.id and event.get("event") == "checkpoint_saved":
            unsubscribe()
            worker_manager.cancel(task.id)

    unsubscribe = worker_manager.subscribe(cancel_after_first_checkpoint)
    first = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert first.status is TaskStatus.CANCELLED and first.resume_checkpoint
    worker_manager.resume(task.id)
    preparing = wait_for(lambda: (live := worker_manager.task(task.id)).last_metrics.get("preparing_done")
                         and live, what="the resumed attempt tokenizing")
    message = render.cancel_message(worker_manager.cancel(preparing.id), "en")
    assert "checkpoints of its earlier attempts are kept" in message and "nothing was trained" not in message
    second = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert (second.status, second.resume_checkpoint) == (TaskStatus.CANCELLED, first.resume_checkpoint)


def test_a_cancel_just_after_training_began_says_the_adapter_is_kept(worker_manager, task_dataset):
    """The task's row gets the run's progress once a second, so just after training began it still
    said "preparing", and the cancel's message claimed nothing was trained (CI saw it after 7 steps).
    The cancel reads the run's stage from its events, which the run writes as they happen."""
    task = worker_manager.create(tiny_task_config(task_dataset, max_steps=400))
    began = threading.Event()
    unsubscribe = worker_manager.subscribe(
        lambda e: began.set() if e.get("task_id") == task.id and e.get("event") == "training_start" else None)
    try:
        assert began.wait(RUN_TIMEOUT_S), "training never began"
        message = render.cancel_message(worker_manager.cancel(task.id), "en")
    finally:
        unsubscribe()
    assert "the adapter trained so far is kept" in message, message
    assert worker_manager.wait(task.id, RUN_TIMEOUT_S).status is TaskStatus.CANCELLED


def test_a_cancel_just_after_a_run_of_another_process_began_says_the_adapter_is_kept(task_db, task_dataset,
                                                                                     tmp_path):
    """The same for a run of another process (a CLI run cancelled in the app), whose row that process
    writes."""
    manager = TaskManager(task_db, start_worker=False)
    task = manager.create(tiny_task_config(task_dataset, max_steps=400))
    app = spawn_manager_process(task_db, "time.sleep(600)", tmp_path / "app.log")
    events = Path(task.output_dir) / "events.jsonl"
    try:
        wait_for(lambda: events.exists() and '"training_start"' in events.read_text(), timeout=RUN_TIMEOUT_S,
                 what=f"training to begin ({(tmp_path / 'app.log').read_text()[-2000:]})")
        message = render.cancel_message(manager.cancel(task.id), "en")
        assert "the adapter trained so far is kept" in message, message
        assert manager.wait(task.id, RUN_TIMEOUT_S).status is TaskStatus.CANCELLED
    finally:
        app.kill()
        manager.shutdown()


def test_shutdown_interrupts_the_running_task_resumably(task_db, task_dataset):
    manager = TaskManager(task_db)
    task = manager.create(tiny_task_config(task_dataset, max_steps=60, save_steps=2))
    wait_for(lambda: manager.task(task.id).resume_checkpoint, what="a checkpoint")
    manager.shutdown(timeout=60)
    after = TaskManager(task_db, start_worker=False)
    try:
        got = after.task(task.id)
        assert got.status is TaskStatus.INTERRUPTED and got.resume_checkpoint
        assert read_meta(got.output_dir)["status"] == "interrupted"
        assert after.resume(task.id).status is TaskStatus.QUEUED
    finally:
        after.shutdown()


def test_run_foreground_is_visible_cancellable_and_resumable_from_the_cli(task_db, task_dataset):
    """A `sage-ft train` run seen and cancelled by another client (the DB flag path), then resumed."""
    cli = TaskManager(task_db, start_worker=False)
    ui = TaskManager(task_db, start_worker=False)
    config = tiny_task_config(task_dataset, max_steps=12)
    seen: list[dict] = []

    def ui_clicks_cancel_after_first_checkpoint(event: dict) -> None:
        if seen and event.get("event") == "batch_end":
            time.sleep(0.3)  # slow steps down once cancelled, so the run cannot finish before the flag lands
        if event.get("event") == "checkpoint_saved" and not seen:
            task = ui.task(event["task_id"])
            seen.append(task.to_dict())
            ui.cancel(task.id)  # another manager: reaches the run through the database

    try:
        result = cli.run_foreground(config, name="from the CLI", on_event=ui_clicks_cancel_after_first_checkpoint)
        [row] = seen
        assert (row["status"], row["source"], row["name"], row["pid"]) == (
            "running", "cli", "from the CLI", psutil.Process().pid)
        assert (result.status, result.task_id, result.output_dir) == ("cancelled", row["id"], Path(row["output_dir"]))
        assert ui.task(row["id"]).status is TaskStatus.CANCELLED

        # `sage-ft train --set output_dir=<run> --set resume_from_checkpoint=last`: continues that folder
        again = cli.run_foreground({**config, "output_dir": row["output_dir"], "resume_from_checkpoint": "last"})
        assert again.status == "completed" and again.output_dir == result.output_dir
        resumed = ui.task(again.task_id)
        assert (resumed.step, resumed.total_steps, resumed.output_dir) == (12, 12, row["output_dir"])
        assert [s["start_step"] > 0 for s in _training_starts(resumed)] == [False, True]
    finally:
        ui.shutdown()
        cli.shutdown()


def test_pause_and_unpause_from_another_process_through_the_cli(worker_manager, task_dataset, capsys):
    """`sage-ft tasks pause/unpause` (its own manager: the database flag path) hold and release a run."""
    from sage_ft.cli import main

    task = worker_manager.create(tiny_task_config(task_dataset, max_steps=12, save_steps=100))
    worker_manager.subscribe(lambda e: time.sleep(0.3) if e.get("event") == "batch_end" else None)  # slower steps
    cli = ["tasks", "--db", str(worker_manager.store.path)]
    wait_for(lambda: worker_manager.task(task.id).step >= 1, what="the first step")
    assert main([*cli, "pause", str(task.id)]) == 0
    log = Path(task.output_dir) / "logs.txt"
    wait_for(lambda: "paused at step" in log.read_text(), what="the run to hold")
    held = int(re.search(r"paused at step (\d+)", log.read_text()).group(1))
    paused = worker_manager.task(task.id)
    assert (paused.status, paused.paused) == (TaskStatus.RUNNING, True) and held < 12
    capsys.readouterr()
    assert main([*cli, "list"]) == 0 and "running ⏸ paused" in capsys.readouterr().out
    time.sleep(2)  # a held run makes no progress
    steps = [e["step"] for e in _events(paused) if e["event"] == "metric_update"]
    assert max(steps) == held and worker_manager.task(task.id).step == held

    assert main([*cli, "unpause", str(task.id)]) == 0
    done = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert (done.status, done.step, done.paused) == (TaskStatus.COMPLETED, 12, False)
    assert f"resumed at step {held}" in log.read_text()
    with pytest.raises(TaskError, match="only a running task can be paused"):
        worker_manager.pause(task.id)


def test_memory_is_released_after_runs(worker_manager, task_dataset):
    """After a warm-up run (imports, allocator arenas), more runs must not keep the model alive.

    Tolerance: RSS may grow by at most 150 MiB over two runs (the demo model plus optimizer state
    is ~10 MiB; the slack is for allocator fragmentation and library caches on a noisy machine).
    The exact check is that no torch module with weights outlives its run.
    """
    import torch

    def rss() -> int:
        gc.collect()
        return psutil.Process().memory_info().rss

    first = worker_manager.create(tiny_task_config(task_dataset))
    assert worker_manager.wait(first.id, RUN_TIMEOUT_S).status is TaskStatus.COMPLETED
    before = rss()
    for _ in range(2):
        t = worker_manager.create(tiny_task_config(task_dataset, lora_rank=16))
        assert worker_manager.wait(t.id, RUN_TIMEOUT_S).status is TaskStatus.COMPLETED
    wait_for(lambda: worker_manager._worker.active is None, 30, "the worker to go idle")
    growth = rss() - before
    assert growth < 150 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
    leftovers = [type(o).__name__ for o in gc.get_objects()  # (stateless activation singletons are fine)
                 if isinstance(o, torch.nn.Module) and next(o.parameters(), None) is not None]
    assert leftovers == []


@pytest.mark.slow
def test_kill_9_of_the_app_mid_run_then_resume_finishes(task_db, task_dataset, tmp_path):
    setup = TaskManager(task_db, start_worker=False)
    task = setup.create(tiny_task_config(task_dataset, max_steps=12, save_steps=2), name="survives kill -9")
    setup.shutdown()
    app = spawn_manager_process(task_db, """
        import subprocess
        # a listener that makes each step last >= 0.5 s, so the kill surely lands mid-run
        manager.subscribe(lambda e: time.sleep(0.5) if e.get("event") == "batch_end" else None)
        tid = manager.list()[0].id
        while manager.task(tid).status.value != "running":
            time.sleep(0.1)
        # a worker child of the run (as a multi-GPU launch would have), recorded by pid + start time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        manager.record_child_process(tid, child.pid)
        print("child", child.pid, flush=True)
        time.sleep(600)
    """, tmp_path / "app.log")
    try:
        db = sqlite3.connect(task_db)
        row = wait_for(lambda: (r := db.execute("SELECT step, resume_checkpoint, child_pid, child_start_time "
                                                "FROM tasks WHERE id=?", (task.id,)).fetchone())[0] >= 3
                       and r[1] and r[2] and r, what=f"a checkpoint and a child ({(tmp_path / 'app.log').read_text()[-2000:]})")
        db.close()
        child = ProcessIdentity(row[2], row[3])
        assert child.is_alive()
        app.send_signal(signal.SIGKILL)
        app.wait(30)
    finally:
        app.kill()

    manager = TaskManager(task_db, start_worker=False)
    try:
        assert manager.store.integrity_check() == "ok"
        got = manager.task(task.id)
        assert got.status is TaskStatus.INTERRUPTED, got
        assert got.resume_checkpoint and Path(got.resume_checkpoint).name.startswith("checkpoint-")
        assert "resume continues from checkpoint-" in got.error
        meta = read_meta(got.output_dir)  # the run folder agrees with the task list (registry, UI read it)
        assert (meta["status"], meta["error"]) == ("interrupted", got.error) and meta["finished_at"]
        wait_for(lambda: not child.is_alive(), 30, "the orphaned child to end")
        checkpoint_step = int(Path(got.resume_checkpoint).name.split("-")[1])

        manager.resume(task.id)
        manager.start_worker()
        finished = manager.wait(task.id, RUN_TIMEOUT_S)
        assert (finished.status, finished.step, finished.total_steps) == (TaskStatus.COMPLETED, 12, 12)
        assert [s["start_step"] for s in _training_starts(finished)] == [0, checkpoint_step]
        assert len(manager.list()) == 1  # nothing duplicated
        meta = json.loads((Path(finished.output_dir) / "finetune_meta.json").read_text())
        assert meta["status"] == "completed"
    finally:
        manager.shutdown()


@pytest.mark.slow
def test_two_app_processes_on_one_database_never_run_a_task_twice(task_db, task_dataset, tmp_path):
    setup = TaskManager(task_db, start_worker=False)
    ids = [setup.create(tiny_task_config(task_dataset, max_steps=2, save_steps=2), name=f"t{i}").id
           for i in range(3)]
    setup.shutdown()
    body = """
        from sage_ft.tasks import TaskStatus
        time.sleep(1)
        while manager.queue() or manager.list([TaskStatus.RUNNING]):
            time.sleep(0.3)
        manager.shutdown()
    """
    apps = [spawn_manager_process(task_db, body, tmp_path / f"app{i}.log") for i in range(2)]
    for app in apps:
        try:
            assert app.wait(RUN_TIMEOUT_S) == 0, (tmp_path / "app0.log").read_text()[-3000:]
        finally:
            app.kill()
    manager = TaskManager(task_db, start_worker=False)
    try:
        tasks = sorted(manager.list(), key=lambda t: t.id)
        assert [t.id for t in tasks] == ids
        assert all(t.status is TaskStatus.COMPLETED and t.attempts == 1 for t in tasks)
        assert all(len(_training_starts(t)) == 1 for t in tasks)  # each ran exactly once
        spans = sorted((t.started_at, t.finished_at) for t in tasks)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(spans, spans[1:], strict=False))  # one at a time
    finally:
        manager.shutdown()


@pytest.mark.slow
def test_multi_process_task_runs_as_a_recorded_child_and_completes(worker_manager, task_dataset):
    """num_processes=2 on CPU: the queue launches `accelerate launch` (gloo DDP) as a child process."""
    task = worker_manager.create(tiny_task_config(task_dataset, max_steps=2, num_processes=2, devices="cpu"))
    db = sqlite3.connect(worker_manager.store.path)
    try:
        child = wait_for(lambda: db.execute("SELECT child_pid, child_start_time FROM tasks WHERE id=?",
                                            (task.id,)).fetchone()[0] and
                         db.execute("SELECT child_pid, child_start_time FROM tasks WHERE id=?", (task.id,)).fetchone(),
                          what="the launcher child to be recorded")
    finally:
        db.close()
    assert ProcessIdentity(*child).pid != psutil.Process().pid
    finished = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert (finished.status, finished.step, finished.total_steps) == (TaskStatus.COMPLETED, 2, 2), finished.error
    assert (Path(finished.output_dir) / "lora" / "adapter_config.json").exists()
    assert not ProcessIdentity(*child).is_alive()
    with sqlite3.connect(worker_manager.store.path) as conn:
        assert conn.execute("SELECT child_pid FROM tasks WHERE id=?", (task.id,)).fetchone() == (None,)


def _running_group(manager, task_id: int) -> tuple[psutil.Process, list[psutil.Process]]:
    """The recorded launcher of a running multi-process task and its ranks, once it is mid-run."""
    wait_for(lambda: manager.get(task_id).step >= 3, what="the data-parallel run to pass step 3")
    with sqlite3.connect(manager.store.path) as conn:
        pid = conn.execute("SELECT child_pid FROM tasks WHERE id=?", (task_id,)).fetchone()[0]
    launcher = psutil.Process(pid)
    ranks = [p for p in launcher.children(recursive=True) if "sage_ft.training.worker_entry" in p.cmdline()]
    assert len(ranks) == 2, [p.cmdline() for p in launcher.children(recursive=True)]
    return launcher, ranks


def _alive(procs: list[psutil.Process]) -> list[int]:
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rank 1", "launcher"])
def test_kill_9_of_a_live_data_parallel_process_fails_the_task_with_its_cause(worker_manager, task_dataset, victim):
    """kill -9 of one rank, or of the `accelerate launch` process itself, mid-run: the task ends ❌
    failed naming the killed process and signal, the launcher's log tail is in the task log, no rank
    is left training, the app stays up and the queue moves on."""
    task = worker_manager.create(tiny_task_config(task_dataset, max_steps=2000, save_steps=50,
                                                  num_processes=2, devices="cpu"), name="data-parallel")
    after = worker_manager.create(tiny_task_config(task_dataset, max_steps=2), name="queued behind it")
    launcher, ranks = _running_group(worker_manager, task.id)
    target = ranks[1] if victim == "rank 1" else launcher
    target.send_signal(signal.SIGKILL)

    failed = worker_manager.wait(task.id, 120)
    assert failed.status is TaskStatus.FAILED and failed.icon == "❌"
    assert f"(pid {target.pid})" in failed.error and "signal 9 (SIGKILL)" in failed.error, failed.error
    assert ("rank 1" in failed.error) == (victim == "rank 1"), failed.error
    assert 3 <= failed.step < 2000
    assert "data-parallel launcher's log" in worker_manager.get(task.id).log_tail
    assert _alive([launcher, *ranks]) == []  # nothing left training into the run directory
    with sqlite3.connect(worker_manager.store.path) as conn:
        assert conn.execute("SELECT child_pid FROM tasks WHERE id=?", (task.id,)).fetchone() == (None,)
    assert worker_manager.wait(after.id, RUN_TIMEOUT_S).status is TaskStatus.COMPLETED  # the queue moved on
