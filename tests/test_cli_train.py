"""``sage-ft train`` / ``demo-model`` as real subprocesses: exit codes, Ctrl-C, kill -9 then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sage_ft.events import read_events
from sage_ft.training import read_meta

FAST = ["--set", "precision=fp32", "--set", "devices=cpu", "--set", "lora_rank=8", "--set", "cutoff_len=128",
        "--set", "learning_rate=1e-3", "--set", "per_device_train_batch_size=2"]


def sage_ft(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_ft", *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy())


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sage_ft", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy())


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


def test_demo_model_and_help_config(demo_model: Path) -> None:
    out = sage_ft("demo-model")
    assert out.returncode == 0 and out.stdout.strip() == str(demo_model)
    help_out = sage_ft("train", "--help-config")
    assert help_out.returncode == 0 and "lora_rank (default 8)" in help_out.stdout


def test_bad_config_and_bad_dataset_exit_non_zero_without_a_run(tmp_path: Path, data_home: Path) -> None:
    bad_value = sage_ft("train", "--set", "lora_rank=zero", "--set", "dataset=x.jsonl")
    assert bad_value.returncode == 2 and "lora_rank" in bad_value.stderr and "whole number" in bad_value.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"instruction": "Q", "output": ""}) + "\n")
    runs_before = set((data_home / "runs").iterdir()) if (data_home / "runs").exists() else set()
    out = sage_ft("train", "--set", f"dataset={empty}")
    assert out.returncode == 1 and "not started" in out.stderr and "empty.jsonl" in out.stderr
    assert (set((data_home / "runs").iterdir()) if (data_home / "runs").exists() else set()) == runs_before


def test_a_mistyped_set_key_is_refused_by_train_and_tasks_clone(tmp_path: Path, data_home: Path) -> None:
    """``--set learning_rat=1e-3`` warned and trained at the default 2e-4: a key typed on the command
    line is an error (exit 2, with the key it likely meant) before any task is queued."""
    from sage_ft.tasks import TaskManager

    with TaskManager(start_worker=False) as manager:
        tasks_before = len(manager.list())
    out = sage_ft("train", "--set", "learning_rat=1e-3", "--set", "dataset=x.jsonl")
    assert out.returncode == 2, out.stderr
    assert "learning_rat: unknown config key (did you mean 'learning_rate'?)" in out.stderr
    clone = sage_ft("tasks", "clone", "999999", "--set", "learning_rat=1e-3")
    assert clone.returncode == 2 and "did you mean 'learning_rate'?" in clone.stderr
    # the key check is what refused it: a known key goes on to look the task up (exit 1, no such task)
    assert sage_ft("tasks", "clone", "999999", "--set", "learning_rate=1e-3").returncode == 1
    with TaskManager(start_worker=False) as manager:
        assert len(manager.list()) == tasks_before


def test_every_config_problem_is_printed_at_once(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: abc\nnum_train_epochs: -1\nlora_rank: 0\ntemplate: vicuna\n")
    out = sage_ft("train", str(config), "--set", "dataset=x.jsonl")
    assert out.returncode == 2
    for problem in ("learning_rate: 'abc' is not a number", "num_train_epochs: -1 is too small",
                    "lora_rank: 0 is too small", "template: 'vicuna' is not allowed"):
        assert problem in out.stderr, out.stderr


def test_a_dataset_whose_answers_are_all_cut_off_is_refused_before_a_task(demo_model, tmp_path: Path) -> None:
    """It printed 'OK: the data can be used for training', queued the task, and failed after loading
    the model with 'no sample keeps an assistant token within cutoff_len 128'."""
    long_prompt = " ".join(f"word{i}" for i in range(120))
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{long_prompt} {i}?", "output": "Yes."}) + "\n"
                            for i in range(10)))
    out = sage_ft("train", "--set", f"dataset={data}", "--set", f"output_dir={tmp_path / 'run'}", *FAST)
    assert out.returncode == 1, out.stdout
    assert "not started" in out.stderr and "no sample keeps an assistant token within cutoff_len 128" in out.stderr
    assert "OK: the data" not in out.stdout.replace("NOT OK", "")
    assert _tasks_in(tmp_path / "run") == [] and not (tmp_path / "run").exists()


def test_yaml_config_with_unknown_key_trains_and_prints_the_run_dir(memorize_jsonl: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"model_name_or_path: demo\ndataset: {memorize_jsonl}\nmax_steps: 2\nlogging_steps: 1\n"
                      f"output_dir: {tmp_path / 'out'}\nmystery_key: 1\nlerning_rate: 0.001\n")
    out = sage_ft("train", str(config), *FAST)
    assert out.returncode == 0, out.stderr
    assert "mystery_key" in out.stderr and "'lerning_rate' ignored (did you mean 'learning_rate'?)" in out.stderr
    assert "step 2/2" in out.stdout and "Rows: 4 read, 4 usable" in out.stdout
    preparing = [line for line in out.stdout.splitlines() if line.startswith("preparing: ")]  # before step 1
    assert preparing == ["preparing: reading the dataset", "preparing: tokenizing 0/4 conversations (0%)",
                         "preparing: tokenizing 4/4 conversations (100%)", "preparing: loading the base model"]
    assert out.stdout.strip().splitlines()[-1] == str(tmp_path / "out")
    assert read_meta(tmp_path / "out")["status"] == "completed"
    [task] = _tasks_in(tmp_path / "out")  # registered in the shared task store, as the web UI sees it
    assert (task.source, task.status.value, task.step, task.total_steps) == ("cli", "completed", 2, 2)
    assert task.pid is not None and task.last_metrics.get("loss") is not None


def _tasks_in(output_dir: Path) -> list:
    from sage_ft.tasks import TaskManager

    with TaskManager(start_worker=False) as manager:
        return [t for t in manager.list() if t.output_dir == str(output_dir)]


def test_a_cli_run_is_a_task_that_another_client_can_cancel(memorize_jsonl: Path, tmp_path: Path) -> None:
    from sage_ft.tasks import TaskManager, TaskStatus

    out_dir = tmp_path / "run"
    proc = start("train", "--set", f"dataset={memorize_jsonl}", "--set", f"output_dir={out_dir}",
                 "--set", "max_steps=2000", *FAST)
    wait_for(lambda: any(t.step >= 1 for t in _tasks_in(out_dir)), proc)
    ui = TaskManager(start_worker=False)  # e.g. the web UI's manager, another process's view of the store
    try:
        [task] = [t for t in ui.list([TaskStatus.RUNNING]) if t.output_dir == str(out_dir)]
        assert (task.source, task.pid) == ("cli", proc.pid)
        ui.cancel(task.id)
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 130, output
        done = ui.task(task.id)
    finally:
        ui.shutdown()
        if proc.poll() is None:
            proc.kill()
    assert done.status is TaskStatus.CANCELLED and 1 <= done.step < 2000
    assert read_meta(out_dir)["status"] == "cancelled" and (out_dir / "lora" / "adapter_model.safetensors").exists()
    assert f"(task {task.id}" in output and output.strip().splitlines()[-1] == str(out_dir)


def test_ctrl_c_cancels_cleanly(memorize_jsonl: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    proc = start("train", "--set", f"dataset={memorize_jsonl}", "--set", f"output_dir={out_dir}",
                 "--set", "max_steps=2000", *FAST)
    wait_for(lambda: any(e["event"] == "metric_update" for e in read_events(out_dir / "events.jsonl")[0]), proc)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    meta = read_meta(out_dir)
    assert meta["status"] == "cancelled" and meta["metrics"]["global_step"] < 2000
    assert (out_dir / "lora" / "adapter_model.safetensors").exists()
    assert output.strip().splitlines()[-1] == str(out_dir)
    assert [t.status.value for t in _tasks_in(out_dir)] == ["cancelled"]


@pytest.mark.slow
def test_kill_9_then_resume_from_last_checkpoint(memorize_jsonl: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    total = 16
    args = ["train", "--set", f"dataset={memorize_jsonl}", "--set", f"output_dir={out_dir}",
            "--set", f"max_steps={total}", "--set", "save_steps=4", "--set", "save_total_limit=2", *FAST]
    proc = start(*args)
    wait_for(lambda: (out_dir / "checkpoint-8" / "trainer_state.json").exists(), proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    killed_at = max(e["step"] for e in read_events(out_dir / "events.jsonl")[0] if e["event"] == "metric_update")
    assert read_meta(out_dir)["status"] == "running" and killed_at < total  # died mid-run

    out = sage_ft(*args, "--set", "resume_from_checkpoint=last", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    meta = read_meta(out_dir)
    assert meta["status"] == "completed" and meta["metrics"]["global_step"] == total
    # the killed run's task was found dead and marked interrupted; the resumed run is a new completed task
    assert [t.status.value for t in _tasks_in(out_dir)] == ["completed", "interrupted"]
    assert meta["resumed_from"].startswith(str(out_dir / "checkpoint-"))
    events = read_events(out_dir / "events.jsonl")[0]
    [loaded] = [e for e in events if e["event"] == "checkpoint_loaded"]
    assert loaded["step"] >= 8 and loaded["step"] % 4 == 0
    starts = [e for e in events if e["event"] == "training_start"]
    assert [s["total_steps"] for s in starts] == [total, total]  # same total step count after resume
    assert starts[1]["start_step"] == loaded["step"]
    resumed_steps = [e["step"] for e in events[events.index(loaded):] if e["event"] == "metric_update"]
    assert resumed_steps == list(range(loaded["step"] + 1, total + 1))  # the loss curve continues


def test_shipped_configs_load_without_unknown_keys() -> None:
    from sage_ft.config import TrainConfig
    from sage_ft.data.sources import dataset_files

    folder = Path(__file__).resolve().parent.parent / "configs"
    for name in ("demo_cpu.yaml", "qwen2.5-0.5b_lora_24gb.yaml", "llama-7b_lora_80gb.yaml"):
        config, unknown = TrainConfig.from_yaml(folder / name)
        assert unknown == [] and config.finetuning_type == "lora", (name, unknown)
    demo, _ = TrainConfig.from_yaml(folder / "demo_cpu.yaml")
    [sample] = dataset_files(demo.dataset)  # 'docs-sample' -> the built-in sample file
    assert sample.suffix == ".jsonl" and sample.exists()


def test_the_shipped_demo_config_trains_as_its_header_says(demo_model: Path, data_home: Path) -> None:
    """``sage-ft train configs/demo_cpu.yaml`` (its header's command) trains on 'docs-sample', the
    built-in set, here next to a set named by its file name in the data home's datasets/ (where the
    UI keeps uploads). Both were refused before a run began ("docs-sample: file not found"): the
    task queue checked the names as paths, though the run itself knew them."""
    (data_home / "datasets").mkdir(exist_ok=True)
    (data_home / "datasets" / "my-upload.jsonl").write_text(
        json.dumps({"instruction": "What is sage-ft?", "output": "A fine-tuning studio."}) + "\n", encoding="utf-8")
    config = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
    out = sage_ft("train", str(config), *FAST, "--set", "max_steps=2", "--set", "dataset=docs-sample,my-upload",
                  "--set", "run_name=shipped-demo", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run = Path(out.stdout.strip().splitlines()[-1])
    files = read_meta(run)["dataset_info"]["files"]
    assert [Path(f).name for f in files] == ["sage-ft-docs.jsonl", "my-upload.jsonl"]
    # each progress line once: the run's INFO log (its logs.txt) reached the terminal beside them
    terminal = out.stdout + out.stderr
    assert terminal.count("preparing: loading the base model") == 1 and "INFO sage_ft" not in terminal, terminal
    assert terminal.count(" train / ") == 1 and "truncated" in terminal  # the run's data line, once
    assert "preparing: loading the base model" in (run / "logs.txt").read_text(encoding="utf-8")
