"""Machine faults made real: a file size limit hit while saving a checkpoint (RLIMIT_FSIZE in a child
process: the write fails with EFBIG, exactly as a full disk fails it with ENOSPC), and a data home
that cannot be created (a path under a regular file, which fails even for root)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sage_ft.tasks import StoreUnavailable, TaskManager, TaskStatus
from sage_ft.training.meta import read_meta

ROOT = Path(__file__).resolve().parent.parent
# Above every file the run itself appends to (events, log, meta, the database's WAL: a few KiB each)
# and below the adapter weights of a checkpoint (~260 KiB for the demo model at rank 8).
FILE_SIZE_LIMIT = 160 * 1024

_CHILD = textwrap.dedent("""
    import json, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    from sage_ft.tasks import TaskManager
    from tests.fixtures_tasks import tiny_task_config

    def limit_files_after_the_first_checkpoint(event):
        if event.get("event") == "checkpoint_saved" and event.get("step") == 2:
            resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.RLIM_INFINITY))

    manager = TaskManager(sys.argv[1], start_worker=False)
    result = manager.run_foreground(tiny_task_config(sys.argv[2], max_steps=6, save_steps=2),
                                    on_event=limit_files_after_the_first_checkpoint)
    manager.shutdown()
    print("RESULT " + json.dumps({"status": result.status, "error": result.error, "task_id": result.task_id}))
""")


def test_file_size_limit_while_saving_a_checkpoint_fails_clearly_and_the_previous_one_resumes(task_db, task_dataset):
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(task_db), str(task_dataset), str(FILE_SIZE_LIMIT)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["status"] == "failed"
    assert "file too large while saving checkpoint-4" in result["error"] and "previous checkpoint is kept" in \
        result["error"]

    manager = TaskManager(task_db, start_worker=False)
    try:
        task = manager.task(result["task_id"])
        assert (task.status, task.error) == (TaskStatus.FAILED, result["error"])
        out = Path(task.output_dir)
        assert read_meta(out)["status"] == "failed" and read_meta(out)["error"] == result["error"]
        assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing half-written
        assert task.resume_checkpoint == str(out / "checkpoint-2")
        # a half-written folder a crash could leave behind is never taken for a checkpoint
        stale = shutil.copytree(out / "checkpoint-2", out / "checkpoint-6.tmp")

        manager.resume(task.id)
        manager.start_worker()
        done = manager.wait(task.id, 240)
        assert (done.status, done.step, done.total_steps) == (TaskStatus.COMPLETED, 6, 6), done.error
        events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
        loaded = [e for e in events if e["event"] == "checkpoint_loaded"]
        assert [e["path"] for e in loaded] == [str(out / "checkpoint-2")]
        assert not Path(stale).exists()
    finally:
        manager.shutdown()


def test_data_home_that_cannot_be_created_gives_a_clear_error(tmp_path, monkeypatch, task_dataset):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    home = blocker / "sage_ft_home"  # mkdir fails with ENOTDIR, for root too
    monkeypatch.setenv("SAGE_FT_HOME", str(home))
    with pytest.raises(StoreUnavailable, match=f"task database cannot be created: cannot create the data folder {home}.*SAGE_FT_HOME"):
        TaskManager(start_worker=False)

    env = {**os.environ, "SAGE_FT_HOME": str(home), "PYTHONPATH": str(ROOT)}
    for argv in (["train", "--set", f"dataset={task_dataset}", "--set", "max_steps=1"], ["tasks", "list"]):
        proc = subprocess.run([sys.executable, "-m", "sage_ft", *argv], capture_output=True, text=True, env=env,
                              timeout=120)
        assert proc.returncode == 1, proc.stderr
        assert f"cannot create the data folder {home}" in proc.stderr and "Traceback" not in proc.stderr
        assert "Not a directory" in proc.stderr and "SAGE_FT_HOME" in proc.stderr
