"""What a model name means, the same for every client: exports, runs, models and tasks by name; the demo
under one name; merged models described by what they were merged from; words meant for the Chat tab.

No vLLM here: the targets are resolved for real on real folders of the data home and a real task store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from sage_ft import paths
from sage_ft.serving import ServerManager, TargetError, resolve_target
from sage_ft.serving.targets import EXPORT_RECORD
from sage_ft.serving.vllm_server import StartProgress
from tests.fixtures_serving import free_port
from tests.fixtures_tasks import tiny_task_config

ROOT = Path(__file__).resolve().parent.parent


def _export(demo: Path, name: str) -> Path:
    """A merged export as ``sage-ft export`` leaves it: weights + its record naming the base."""
    out = paths.exports_dir() / name
    shutil.copytree(demo, out)
    (out / EXPORT_RECORD).write_text(json.dumps({"kind": "merged", "base_model": str(demo)}))
    return out


def test_export_run_and_model_names_resolve_everywhere_alike(serving_demo_model, serving_adapters):
    tag = uuid.uuid4().hex[:6]
    export = _export(serving_demo_model, f"mymerge-{tag}")
    model = paths.models_dir() / f"mybase-{tag}"
    shutil.copytree(serving_demo_model, model)
    run = paths.runs_dir() / f"myrun-{tag}"
    shutil.copytree(serving_adapters["a"], run / "lora")
    (run / "finetune_meta.json").write_text(json.dumps({"status": "completed",
                                                       "base_model_path": str(serving_demo_model)}))
    try:
        merged = resolve_target(export.name)  # `sage-ft switch mymerge`, the Chat picker, serve --model
        assert (merged.kind, merged.path, merged.label) == ("merged", export.resolve(), export.name)
        assert merged.merged_from == "demo"  # from the export's record
        assert resolve_target(model.name).path == model.resolve() and resolve_target(model.name).kind == "base"
        adapter = resolve_target(run.name)
        assert adapter.kind == "adapter" and adapter.run_dir == run.resolve()
        # the CLI's early check lets the names through (it said "does not exist" before); on a port no
        # server listens on (the session's shared server, asked to switch, served the export after this)
        nobody = str(free_port())
        for argv in (["switch", export.name, "--port", nobody], ["serve", "--model", export.name, "--stop-orphans"]):
            proc = subprocess.run([sys.executable, "-m", "sage_ft", *argv], cwd=ROOT, capture_output=True,
                                  text=True, timeout=120)
            assert "does not exist" not in proc.stderr and "invalid" not in proc.stderr, proc.stderr[-2000:]
        refused = subprocess.run([sys.executable, "-m", "sage_ft", "switch", "#987654", "--port", nobody], cwd=ROOT,
                                 capture_output=True, text=True, timeout=120)  # while a missing task is refused
        assert refused.returncode == 2 and "no task with id 987654" in refused.stderr, refused.stderr[-2000:]
        # ... and `sage-ft export NAME` finds it by the same rule
        from sage_ft.export.source import run_dir_for

        assert run_dir_for(export.name) == export and run_dir_for(run.name) == run
    finally:
        for folder in (export, model, run):
            shutil.rmtree(folder, ignore_errors=True)


def test_task_ids_are_resolved_by_the_core_for_every_client(monkeypatch, tmp_path, serving_demo_model,
                                                             serving_adapters, task_dataset):
    """The Chat picker with '#2' typed said 'model directory #2 does not exist' (ids were mapped by the
    CLI only); the core's resolve_target maps them now, and names a missing task as such."""
    from sage_ft.tasks import TaskManager

    monkeypatch.setenv("SAGE_FT_HOME", str(tmp_path / "home"))  # a store of its own: no task leaks out
    tasks = TaskManager(start_worker=False)
    try:
        task = tasks.create(tiny_task_config(task_dataset, model_name_or_path=str(serving_demo_model)),
                            name=f"named-{uuid.uuid4().hex[:6]}")
    finally:
        tasks.shutdown()
    run = Path(task.output_dir)
    shutil.copytree(serving_adapters["b"], run / "lora")
    (run / "finetune_meta.json").write_text(json.dumps({"status": "completed",
                                                       "base_model_path": str(serving_demo_model)}))
    for spelling in (f"#{task.id}", str(task.id), task.name):
        target = resolve_target(spelling)
        assert target.kind == "adapter" and target.run_dir == run.resolve(), spelling
        assert target.serving_base == serving_demo_model.resolve()
    with pytest.raises(TargetError, match="no task with id 987654"):
        resolve_target("#987654")
    # the manager every client switches through says the same (outcome failed, not a traceback)
    manager = ServerManager(backend="none", install_exit_handlers=False)
    result = manager.switch(f"#{task.id}")
    assert result.outcome == "restart_needed" and result.target == run.name, result.summary
    assert "no task with id 987654" in manager.switch("#987654").message


def test_the_demo_has_one_name_however_it_was_named(serving_demo_model):
    """Served as 'demo' at the first start, it came back as 'demo-tiny-llama' (its folder) after a
    restart, which switches by path: the registry's name is kept either way."""
    by_name, by_path = resolve_target("demo"), resolve_target(str(serving_demo_model))
    assert by_name.label == by_path.label == "demo" and by_name.path == by_path.path
    manager = ServerManager(backend="none", install_exit_handlers=False)
    manager.switch(str(serving_demo_model))
    assert manager.status()["model_label"] == "demo"


def test_a_merged_model_is_not_its_own_base(serving_demo_model, serving_adapters):
    """The banner said 'Base: …/exports/mymerge · Path: …/exports/mymerge': a merged model has no base
    to serve; the status says what it was merged from instead."""
    export = _export(serving_demo_model, f"merged-{uuid.uuid4().hex[:6]}")
    try:
        manager = ServerManager(backend="none", install_exit_handlers=False)
        manager.switch(export.name)
        status = manager.status()
        assert status["model_type"] == "merged" and status["model_path"] == str(export.resolve())
        assert status["base_model"] is None and status["merged_from"] == "demo"
        manager.switch(str(serving_adapters["a"]))  # an adapter keeps its base
        assert manager.status()["base_model"] == str(serving_demo_model.resolve())
    finally:
        shutil.rmtree(export, ignore_errors=True)


def test_a_hub_model_that_cannot_be_fetched_is_advised_in_chat_words():
    """Offline (the tests run with HF_HUB_OFFLINE=1), an uncached hub id is refused; where a model is
    picked to chat with, the advice must not name the training config key model_name_or_path."""
    with pytest.raises(TargetError) as info:
        resolve_target(f"nobody-{uuid.uuid4().hex[:6]}/not-a-model")
    text = str(info.value)
    assert "model_name_or_path" not in text and "give that folder as the model" in text, text
    assert "LocalEntryNotFound" not in text and "cannot reach the hub" in text, text


def test_progress_lines_show_our_stage_names_not_vllm_log_lines(tmp_path, serving_demo_model):
    item = StartProgress("loading weights", 12.34, "(APIServer pid=1) WARNING 12-06 13:20:31 [x.py:1] Model "
                         "Runner V2 requires Triton; using the V1 model runner instead.")
    assert str(item) == "[ 12.3s] loading weights"


def test_a_crash_is_told_by_how_the_server_ended_and_its_last_error_only(tmp_path):
    """The chat said 'the vLLM server (pid N) exited with code -9: (APIServer pid=N) INFO … Avg prompt
    throughput …; it restarts … or with restart()': an INFO line, a method name, and 'restart' twice."""
    from sage_ft.serving.manager import how_it_ended
    from sage_ft.serving.vllm_server import ServerSpec, VLLMServer

    log = tmp_path / "vllm.log"
    log.write_text("(APIServer pid=14354) INFO 12-06 13:20:31 [loggers.py:335] Engine 000: Avg prompt "
                   "throughput: 1.4 tokens/s\n(APIServer pid=14354) WARNING 12-06 13:20:32 [x.py:9] slow\n")
    server = VLLMServer(ServerSpec(str(tmp_path), "x", 1), log_path=log)
    assert server.last_error_line() == ""
    assert how_it_ended(-9) == "killed by signal 9" and how_it_ended(1) == "exit code 1"
    with log.open("a") as fh:
        fh.write("(EngineCore pid=14360) ERROR 12-06 13:20:33 [core.py:700] EngineCore failed to start.\n"
                 "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: out of memory\n")
    assert server.last_error_line() == "RuntimeError: out of memory"
