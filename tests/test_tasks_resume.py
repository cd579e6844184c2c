"""Resuming a task: a damaged checkpoint is named and passed over, a checkpoint can be picked, the
curves keep one value per step across attempts, and the task's start, duration and throughput
count the time actually trained (real training on the demo model, real kill -9, real files)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from sage_ft.cli import main
from sage_ft.events import EventEmitter
from sage_ft.tasks import TaskManager, TaskStatus, rundir
from sage_ft.tasks.task import TaskStateError
from tests.fixtures_tasks import RUN_TIMEOUT_S, spawn_manager_process, tiny_task_config, wait_for


def _cli(capsys, db: Path, *args: str) -> tuple[int, str, str]:
    code = main(["tasks", "--db", str(db), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _events(output_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "events.jsonl").read_text().splitlines()]


def _loss_steps(output_dir: str | Path) -> list[int]:
    return [e["step"] for e in rundir.metrics_history(output_dir) if "loss" in e]


@pytest.mark.slow
def test_a_damaged_last_checkpoint_of_a_killed_run_is_named_and_passed_over(task_db, task_dataset, tmp_path, capsys):
    """The tester's repro: kill -9 mid-run, `truncate -s 100` the last checkpoint's adapter weights,
    `sage-ft tasks resume ID`. It failed every time with 'SafetensorError: ... invalid header
    length' and picked the same checkpoint again; now the damage is named (folder, file, what is
    wrong), the run continues from the newest intact checkpoint and finishes. Its curve has each
    step once (the killed attempt's steps after that checkpoint are replaced), it keeps its first
    start, and its duration leaves out the time it lay dead."""
    setup = TaskManager(task_db, start_worker=False)
    task = setup.create(tiny_task_config(task_dataset, max_steps=10, save_steps=2), name="damaged")
    setup.shutdown()
    app = spawn_manager_process(task_db, """
        manager.subscribe(lambda e: time.sleep(0.4) if e.get("event") == "batch_end" else None)  # slower steps
        time.sleep(600)
    """, tmp_path / "app.log")
    try:
        db = sqlite3.connect(task_db)
        first_start = wait_for(lambda: (r := db.execute("SELECT step, resume_checkpoint, started_at FROM tasks "
                                                        "WHERE id=?", (task.id,)).fetchone())[0] >= 7
                               and (r[1] or "").endswith(("checkpoint-6", "checkpoint-8")) and r,
                               what=f"checkpoint-6 ({(tmp_path / 'app.log').read_text()[-2000:]})")
        db.close()
        app.send_signal(signal.SIGKILL)
        app.wait(30)
    finally:
        app.kill()
    out = Path(task.output_dir)
    *_, intact, last = rundir.checkpoint_folders(out)
    os.truncate(last / "adapter_model.safetensors", 100)  # truncate -s 100
    time.sleep(1.0)  # lying dead: not time trained

    manager = TaskManager(task_db, start_worker=False)
    try:
        interrupted = manager.task(task.id)
        assert interrupted.status is TaskStatus.INTERRUPTED
        assert interrupted.resume_checkpoint == str(intact) and f"resume continues from {intact.name}" in \
            interrupted.error
        code, shown, _ = _cli(capsys, task_db, "show", str(task.id))
        assert code == 0 and f"damaged:   {last.name} (adapter_model.safetensors is cut short" in shown

        code, said, err = _cli(capsys, task_db, "resume", str(task.id))
        assert code == 0, err
        assert f"{last.name} is damaged (adapter_model.safetensors is cut short or corrupt (100 bytes" in said
        assert f"continuing from {intact.name}" in said and f"will continue from {intact}" in said
        queued = manager.task(task.id)
        assert (queued.status, queued.resume_checkpoint) == (TaskStatus.QUEUED, str(intact))
        assert f"{last.name} is damaged" in queued.error  # the task's message until it starts
        assert f"resume: {last.name} is damaged (adapter_model.safetensors" in (out / "logs.txt").read_text()

        # damaged after it was queued again (before it started): refused at start with a sentence
        rng = intact / "rng_state.pth"
        saved = rng.read_bytes()
        os.truncate(rng, 10)
        manager.start_worker()
        failed = manager.wait(task.id, RUN_TIMEOUT_S)
        assert failed.status is TaskStatus.FAILED
        assert failed.error == (f"{intact.name} in {out} is damaged (rng_state.pth is cut short or corrupt (not a "
                                f"complete torch file)); `sage-ft tasks resume {task.id}` continues from the newest "
                                "intact checkpoint")
        rng.write_bytes(saved)
        assert manager.resume(task.id).resume_checkpoint == str(intact)
        done = manager.wait(task.id, RUN_TIMEOUT_S)
        assert (done.status, done.step, done.total_steps) == (TaskStatus.COMPLETED, 10, 10), done.error
        loaded = [e["path"] for e in _events(out) if e["event"] == "checkpoint_loaded"]
        assert loaded == [str(intact)]
        assert rundir.checkpoint_folders(out)[-1].name == "checkpoint-10" and not rundir.resume_choice(out).damaged

        logged = [e["step"] for e in _events(out) if e["event"] == "metric_update" and "loss" in e]
        assert len(logged) > len(set(logged))  # events.jsonl stays the record of both attempts
        assert _loss_steps(out) == list(range(1, 11))  # the curve: each step once, from the attempt that continued
        code, shown, _ = _cli(capsys, task_db, "show", str(task.id), "--json")
        assert [e["step"] for e in json.loads(shown)["metrics_history"] if "loss" in e] == list(range(1, 11))

        assert done.started_at == first_start[2]  # the first start, not the resume's
        assert done.duration_s <= done.finished_at - done.started_at - 1.0  # the second it lay dead is left out
    finally:
        manager.shutdown()


def test_a_picked_checkpoint_is_used_and_unknown_or_damaged_ones_are_refused(worker_manager, task_dataset, capsys):
    """`sage-ft tasks resume ID --checkpoint N`: an unknown N and a damaged checkpoint are refused
    with a sentence (the task stays as it was), no intact checkpoint at all is said plainly, and a
    picked older checkpoint is where the run continues; the newer ones it abandons are set aside,
    so a later resume never jumps back onto them."""
    db = worker_manager.store.path
    task = worker_manager.create(tiny_task_config(task_dataset, max_steps=8, save_steps=2))

    def cancel_after_checkpoint_6(event: dict) -> None:
        if event.get("task_id") == task.id and event.get("event") == "checkpoint_saved" and event.get("step") == 6:
            unsubscribe()
            worker_manager.cancel(task.id)

    unsubscribe = worker_manager.subscribe(cancel_after_checkpoint_6)
    cancelled = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert cancelled.status is TaskStatus.CANCELLED
    out = Path(task.output_dir)
    assert [p.name for p in rundir.checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]

    code, _, err = _cli(capsys, db, "resume", str(task.id), "--checkpoint", "5")
    assert code == 1 and f"task {task.id} has no checkpoint-5 in {out} (its intact checkpoints: checkpoint-2, " \
                          "checkpoint-4, checkpoint-6)" in err
    code, _, err = _cli(capsys, db, "resume", str(task.id), "--checkpoint", "latest")
    assert code == 1 and "'latest' is not a checkpoint; give its step, e.g. 30 for checkpoint-30" in err
    optimizer = out / "checkpoint-4" / "optimizer.pt"
    os.truncate(optimizer, optimizer.stat().st_size // 2)
    code, _, err = _cli(capsys, db, "resume", str(task.id), "--checkpoint", "checkpoint-4")
    assert code == 1 and f"checkpoint-4 of task {task.id} is damaged (optimizer.pt is cut short or corrupt" in err
    assert "pick another (its intact checkpoints: checkpoint-2, checkpoint-6)" in err
    assert worker_manager.task(task.id).status is TaskStatus.CANCELLED  # a refusal changes nothing

    for step in (2, 6):  # with no intact checkpoint left, the refusal says so and what to do
        (out / f"checkpoint-{step}").rename(out / f"kept-{step}")
    with pytest.raises(TaskStateError, match=rf"no checkpoint in {out} is intact \(checkpoint-4 is damaged \("
                                             rf"optimizer.pt .*\); start it again with `sage-ft tasks retry {task.id}`"
                       ) as refused:
        worker_manager.resume(task.id)
    assert (refused.value.action, refused.value.reason) == ("resume", "no_intact_checkpoint")
    for step in (2, 6):
        (out / f"kept-{step}").rename(out / f"checkpoint-{step}")

    code, said, err = _cli(capsys, db, "resume", str(task.id), "--checkpoint", "2")
    assert code == 0, err
    assert f"checkpoint-6 (newer than checkpoint-2) moved to {out / 'superseded'}" in said
    assert (out / "superseded" / "checkpoint-6" / "trainer_state.json").is_file()
    assert worker_manager.task(task.id).resume_checkpoint == str(out / "checkpoint-2")
    done = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert (done.status, done.step) == (TaskStatus.COMPLETED, 8), done.error
    assert [e["path"] for e in _events(out) if e["event"] == "checkpoint_loaded"] == [str(out / "checkpoint-2")]
    assert _loss_steps(out) == list(range(1, 9))


def test_the_curve_keeps_the_attempt_that_continued_read_as_it_grows(tmp_path):
    """The history reader (incremental, as the Monitor polls it) over an events file written by the
    real emitter: the killed attempt's steps after the checkpoint stay until the resumed attempt
    logs, then its values replace them; steps up to the checkpoint (an eval at it too) are kept."""
    run = tmp_path / "run"
    emitter = EventEmitter(run / "events.jsonl")
    emitter.emit("training_start", total_steps=8, start_step=0)
    for step in range(1, 6):
        emitter.emit("metric_update", step=step, loss=10.0 - step)
    emitter.emit("metric_update", step=4, eval_loss=7.5)
    assert _loss_steps(run) == [1, 2, 3, 4, 5]

    emitter.emit("training_start", total_steps=8, start_step=4)  # resumed from checkpoint-4
    assert _loss_steps(run) == [1, 2, 3, 4, 5]  # nothing redone yet: the old values still stand
    emitter.emit("metric_update", step=5, loss=0.5)
    history = rundir.metrics_history(run)
    assert [(e["step"], e.get("loss", e.get("eval_loss"))) for e in history] == \
        [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (4, 7.5), (5, 0.5)]
    for step in (6, 7, 8):
        emitter.emit("metric_update", step=step, loss=1.0 / step)
    assert _loss_steps(run) == [1, 2, 3, 4, 5, 6, 7, 8]
    rundir._HISTORY._entries.clear()  # read from scratch (another process): the same curve
    assert _loss_steps(run) == [1, 2, 3, 4, 5, 6, 7, 8] and rundir.metrics_history(run)[5]["loss"] == 0.5


def test_time_held_by_a_pause_is_not_counted_as_training(worker_manager, task_dataset):
    """A task paused for a while showed '1 tok/s' and a duration that ran on while it was held: the
    duration, the tokens/s after the pause and the run's final tokens/s leave the pause out."""
    # The second step is seen in the run's events, written as it ends (the task row's step is written
    # about once a second: an idle machine did all 60 steps within one, and the pause came after them).
    # 200 steps (~3 s here) leave the pause time to land on a loaded machine too.
    task = worker_manager.create(tiny_task_config(task_dataset, max_steps=200, save_steps=1000))
    wait_for(lambda: max(_loss_steps(task.output_dir), default=0) >= 2, what="the second step")
    worker_manager.pause(task.id)
    paused_at = time.time()
    log = Path(task.output_dir) / "logs.txt"
    wait_for(lambda: "paused at step" in log.read_text() or worker_manager.task(task.id).status.is_final,
             what="the run to hold")
    assert "paused at step" in log.read_text(), f"the run ended unpaused: {worker_manager.task(task.id).status}"
    time.sleep(3.0)
    held = time.time() - paused_at
    frozen = worker_manager.task(task.id).duration_s
    time.sleep(0.5)
    assert worker_manager.task(task.id).duration_s == frozen  # a held task's clock stands still
    worker_manager.unpause(task.id)
    done = worker_manager.wait(task.id, RUN_TIMEOUT_S)
    assert done.status is TaskStatus.COMPLETED, done.error
    assert done.duration_s <= done.finished_at - done.started_at - held + 1e-3

    metrics = json.loads((Path(done.output_dir) / "finetune_meta.json").read_text())["metrics"]
    assert metrics["paused_seconds"] >= 3.0
    assert metrics["tokens_per_second"] == pytest.approx(metrics["tokens_seen"] / metrics["train_runtime"])
    assert done.last_metrics["tokens_per_second"] == pytest.approx(metrics["tokens_per_second"])
    logs = [e for e in _events(done.output_dir) if e["event"] == "metric_update" and "loss" in e]
    across = next(b for a, b in zip(logs, logs[1:], strict=False) if b["time"] - a["time"] >= 3.0)
    before = logs[logs.index(across) - 1]
    tokens = across["tokens_seen"] - before["tokens_seen"]
    assert across["tokens_per_second"] > tokens / (across["time"] - before["time"] - 2.5)
