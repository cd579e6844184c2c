"""``sage-ft tasks ...``: the CLI client of the task store (in-process ``main`` and one real process)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sage_ft.cli import main
from sage_ft.cli.tasks import _width
from sage_ft.tasks import TaskManager, TaskStatus, task_run_dir
from tests.fixtures_tasks import tiny_task_config


def _cli(capsys, db: Path, *args: str) -> tuple[int, str, str]:
    code = main(["tasks", "--db", str(db), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_list_and_show(capsys, idle_manager, task_dataset):
    db = idle_manager.store.path
    assert _cli(capsys, db, "list") == (0, "no tasks\n", "")
    a = idle_manager.create(tiny_task_config(task_dataset), name="first run")
    b = idle_manager.create(tiny_task_config(task_dataset), name="second run")
    idle_manager.cancel(b.id)

    code, out, _ = _cli(capsys, db, "list")
    assert code == 0
    header, row_b, row_a = out.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "PROGRESS"]
    assert row_a.split()[:4] == [str(a.id), "⏳", "queued", "0/?"] and row_a.endswith("first run")
    assert row_b.split()[:3] == [str(b.id), "⏹", "cancelled"]
    # columns line up in a terminal whatever the status icon: ⚠️ is two characters, two columns
    assert [_width(s) for s in ("⚠️ interrupted", "✅ completed", "⏹ cancelled", "模型 run")] == [14, 12, 11, 8]

    code, out, _ = _cli(capsys, db, "list", "--json", "--status", "queued")
    [data] = json.loads(out)
    assert (code, data["id"], data["status"], data["icon"], data["name"]) == (0, a.id, "queued", "⏳", "first run")

    code, out, _ = _cli(capsys, db, "show", str(a.id))
    assert code == 0 and "status:    ⏳ queued" in out and "queue:     position 1" in out
    assert "max_steps: 4" in out and str(task_dataset.resolve()) in out

    # as the UI writes ids (and `sage-ft switch` takes); the estimated start is "now" for the first in the
    # queue, so it moves with the clock between the two calls (a second apart once in CI)
    def steady(text: str) -> str:
        return re.sub(r"estimated start [\d-]+ [\d:]+", "estimated start …", text)

    assert steady(_cli(capsys, db, "show", f"#{a.id}")[1]) == steady(out)
    with pytest.raises(SystemExit):
        _cli(capsys, db, "show", "first")
    assert "'first' is not a task id; give a number such as 7 (or #7)" in capsys.readouterr().err

    code, out, _ = _cli(capsys, db, "show", str(a.id), "--json")
    data = json.loads(out)
    assert (data["queue_position"], data["config"]["max_steps"], data["checkpoints"]) == (1, 4, [])


def test_cancel_delete_resume_and_unknown_ids(capsys, idle_manager, task_dataset):
    db = idle_manager.store.path
    task = idle_manager.create(tiny_task_config(task_dataset))
    for action in ("show", "cancel", "delete", "resume", "retry", "pause", "unpause"):
        assert _cli(capsys, db, action, "999") == (1, "", "error: no task with id 999 (see `sage-ft tasks list`)\n")

    assert _cli(capsys, db, "cancel", str(task.id))[:2] == (0, f"task {task.id}: ⏹ cancelled\n")
    code, _, err = _cli(capsys, db, "cancel", str(task.id))
    assert code == 1 and "already cancelled" in err
    code, _, err = _cli(capsys, db, "resume", str(task.id))
    assert code == 1 and "no checkpoint" in err and f"sage-ft tasks retry {task.id}" in err
    code, out, _ = _cli(capsys, db, "retry", str(task.id))
    assert code == 0 and "queued" in out and "sage-ft tasks work" in out  # no app runs to start it
    assert _cli(capsys, db, "delete", str(task.id))[:2] == (0, f"task {task.id} deleted (it had not started: no files)\n")
    assert [t.status for t in idle_manager.list()] == [TaskStatus.QUEUED]


def test_clone_names_the_copy_from_run_name_or_numbers_it(capsys, idle_manager, task_dataset):
    """`tasks clone ID --set run_name=q-b` was accepted but the task stayed '<name> (copy)' in folder
    task-000N-<name>-copy, and clones of clones became 'x (copy) (copy)'."""
    db = idle_manager.store.path
    original = idle_manager.create(tiny_task_config(task_dataset, run_name="x"))
    code, out, err = _cli(capsys, db, "clone", str(original.id), "--set", "run_name=q-b", "--set", "lora_rank=4")
    assert code == 0, err
    named = idle_manager.list()[0]
    assert (named.name, named.config_dict["run_name"], named.config_dict["lora_rank"]) == ("q-b", "q-b", 4)
    assert Path(named.output_dir).name == f"task-{named.id:04d}-q-b"

    first = idle_manager.clone(original.id)
    second = idle_manager.clone(first.id)  # a copy of the copy: another copy of x
    third = idle_manager.clone(original.id)
    assert [t.name for t in (first, second, third)] == ["x (copy)", "x (copy 2)", "x (copy 3)"]
    assert Path(second.output_dir).name == f"task-{second.id:04d}-x-copy-2"
    assert second.config_dict["run_name"] == "x (copy 2)"


def test_work_runs_the_queue_then_show_and_delete_files(capsys, task_db, task_dataset):
    manager = TaskManager(task_db, start_worker=False)
    task = manager.create(tiny_task_config(task_dataset))
    manager.shutdown()
    code, out, _ = _cli(capsys, task_db, "work", "--until-empty")
    assert code == 0 and "working on the task queue" in out

    code, out, _ = _cli(capsys, task_db, "show", str(task.id))
    assert "status:    ✅ completed" in out and "checkpoints: checkpoint-2, checkpoint-4" in out
    assert "progress:  step 4/4" in out and "loss" in out
    code, out, _ = _cli(capsys, task_db, "show", str(task.id), "--json")
    data = json.loads(out)
    assert [m["step"] for m in data["metrics_history"] if "loss" in m] == [1, 2, 3, 4]

    # a finished run is run again with clone (retry named it; there was no such command)
    code, _, err = _cli(capsys, task_db, "retry", str(task.id))
    assert code == 1 and f"`sage-ft tasks clone {task.id}` runs a finished config again" in err
    code, out, _ = _cli(capsys, task_db, "clone", str(task.id), "--set", "max_steps=2")
    assert code == 0 and "a new run of task 1's config, with max_steps=2" in out
    with TaskManager(task_db, start_worker=False) as manager:
        clone = max(manager.list(), key=lambda t: t.id)
    assert clone.status is TaskStatus.QUEUED and clone.config.max_steps == 2 and clone.output_dir != task.output_dir
    assert _cli(capsys, task_db, "clone", str(task.id), "--set", "max_steps")[0] == 2
    code, _, err = _cli(capsys, task_db, "clone", str(task.id), "--set", "lora_rank=zero")
    assert code == 1 and "lora_rank: 'zero' is not a whole number" in err

    assert Path(task.output_dir).is_dir()
    code, out, _ = _cli(capsys, task_db, "delete", str(task.id), "--files")
    assert code == 0 and not Path(task.output_dir).exists()


def test_real_process_exit_code_and_message(task_db):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-m", "sage_ft", "tasks", "--db", str(task_db), "show", "7"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr.strip() == "error: no task with id 7 (see `sage-ft tasks list`)"


def test_a_reader_that_leaves_early_gets_no_traceback(task_db):
    """`sage-ft tasks list | head -1`: the pipe closes before everything is written."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "sage_ft", "tasks", "--db", str(task_db), "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == "", err


def test_task_ids_stand_for_their_runs_where_a_model_is_expected(capsys, monkeypatch, tmp_path, demo_model,
                                                                  task_dataset):
    """`sage-ft switch 7`, `sage-ft chat --model '#7'`, `sage-ft export 7`: a task id (as `tasks list`
    shows it) means that task's run; a folder of that name still wins; an unknown id says so."""
    monkeypatch.setenv("SAGE_FT_HOME", str(tmp_path / "home"))  # a store of its own (the CLI opens the home's)
    manager = TaskManager(start_worker=False)
    try:
        task = manager.create(tiny_task_config(task_dataset, model_name_or_path=str(demo_model)), name="for switch")
    finally:
        manager.shutdown()
    assert task_run_dir(str(task.id)) == task_run_dir(f"#{task.id}") == Path(task.output_dir)
    assert task_run_dir("demo") is None and task_run_dir("Qwen/Qwen2.5-0.5B-Instruct") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / str(task.id)).mkdir()
    assert task_run_dir(str(task.id)) is None  # ./1 is a folder: it is meant
    with pytest.raises(SystemExit):
        main(["switch", "987654"])
    assert "argument model: no task with id 987654" in capsys.readouterr().err
    # a task's name, as `tasks list` shows it, means its run too, unless several tasks carry it; a
    # task named like the demo model does not take "demo" from it
    assert task_run_dir("for switch") == Path(task.output_dir)
    manager = TaskManager(start_worker=False)
    try:
        again = manager.create(tiny_task_config(task_dataset, model_name_or_path=str(demo_model)), name="for switch")
        manager.create(tiny_task_config(task_dataset, model_name_or_path=str(demo_model)), name="demo")
    finally:
        manager.shutdown()
    assert task_run_dir("demo") is None
    with pytest.raises(SystemExit):
        main(["switch", "for switch"])
    assert f"2 tasks are named 'for switch' (#{task.id}, #{again.id}); give the task id" in capsys.readouterr().err
