"""Data-parallel launch: argv and configs checked by accelerate's own parser, and a real 2-process gloo run."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import pytest
import yaml

from sage_ft.config import ConfigError, TrainConfig
from sage_ft.events import read_events
from sage_ft.training import launcher


def _accelerate_args(argv: list[str]):
    """Parse our argv with accelerate's own launch parser and validation (what `accelerate launch` does)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    assert argv[1:3] == ["-m", "accelerate.commands.launch"]
    args = launch_command_parser().parse_args(argv[3:])
    validated, defaults, _ = _validate_launch_command(args)
    return validated, defaults


def test_process_count_and_gpu_ids():
    assert launcher.process_count(TrainConfig()) == 1
    assert launcher.process_count(TrainConfig(devices="0,1,3")) == 3
    assert launcher.process_count(TrainConfig(num_processes=4, devices="cpu")) == 4
    assert launcher.needs_multi_process(TrainConfig(devices="0,1"))
    assert not launcher.needs_multi_process(TrainConfig(devices="0"))
    with pytest.raises(ConfigError, match="devices"):
        launcher.gpu_ids(TrainConfig(devices="gpu0"))


def test_cpu_argv_is_an_accelerate_command(tmp_path):
    config = TrainConfig(num_processes=2, devices="cpu")
    argv = launcher.launch_argv(config, tmp_path / "c.yaml", cpu=True)
    assert all(isinstance(a, str) for a in argv)
    assert argv[-3:] == ["-m", "sage_ft.training.worker_entry", str(tmp_path / "c.yaml")]
    args, _ = _accelerate_args(argv)
    assert args.num_processes == 2 and args.multi_gpu and args.module
    assert args.training_script == "sage_ft.training.worker_entry"
    assert args.num_cpu_threads_per_process >= 1


def test_gpu_argv_names_the_gpus(tmp_path):
    argv = launcher.launch_argv(TrainConfig(devices="0,1"), tmp_path / "c.yaml", cpu=False, main_process_port=29512)
    assert argv[argv.index("--gpu_ids") + 1] == "0,1"
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[argv.index("--main_process_port") + 1] == "29512"


def test_multinode_config_loads_in_accelerate(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    paths = [launcher.write_multinode_config(2, rank, "10.0.0.1", 29555, processes_per_machine=8,
                                             mixed_precision="bf16", path=tmp_path / f"rank{rank}.yaml")
             for rank in (0, 1)]
    for rank, path in enumerate(paths):
        cfg = load_config_from_file(str(path))
        assert (cfg.num_machines, cfg.machine_rank, cfg.num_processes) == (2, rank, 16)
        assert (cfg.main_process_ip, cfg.main_process_port) == ("10.0.0.1", 29555)
        assert str(cfg.distributed_type) in ("MULTI_GPU", "DistributedType.MULTI_GPU")
    argv = launcher.launch_argv(TrainConfig(), tmp_path / "c.yaml", accelerate_config=paths[1])
    assert argv[argv.index("--config_file") + 1] == str(paths[1])
    assert yaml.safe_load(paths[1].read_text())["machine_rank"] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_machines=2, machine_rank=2, main_process_ip="10.0.0.1"), "machine_rank"),
    (dict(num_machines=2, machine_rank=0, main_process_ip=" "), "main_process_ip"),
    (dict(num_machines=2, machine_rank=0, main_process_ip="h", main_process_port=70000), "main_process_port"),
])
def test_multinode_config_rejects_bad_values(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        launcher.write_multinode_config(path=tmp_path / "x.yaml", **kwargs)


def test_vllm_parallel_args_parse_in_vllm():
    args = launcher.vllm_parallel_args(2, 2, gpus_per_node=2, num_attention_heads=32, num_hidden_layers=24)
    assert args == ["--tensor-parallel-size", "2", "--pipeline-parallel-size", "2",
                    "--distributed-executor-backend", "ray"]
    assert launcher.vllm_parallel_args(2, gpus_per_node=8)[-1] == "mp"
    assert launcher.vllm_parallel_args() == ["--tensor-parallel-size", "1", "--pipeline-parallel-size", "1"]
    with pytest.raises(ConfigError, match="divide"):
        launcher.vllm_parallel_args(3, num_attention_heads=32)
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parsed = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(["--model", "m", *args])
    assert (parsed.tensor_parallel_size, parsed.pipeline_parallel_size) == (2, 2)
    assert parsed.distributed_executor_backend == "ray"


def _rank_lines(log_text: str) -> dict[int, str]:
    """``rank N: <status> at step S ...`` lines each rank prints at its end (worker_entry)."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^rank (\d+): (.*)$", log_text, re.M)}


def _wait_for_step(handle, step: int, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and handle.poll() is None:
        events, _ = read_events(handle.events_path)
        if any(e["event"] == "metric_update" and e.get("step", 0) >= step for e in events):
            return
        time.sleep(0.5)
    raise AssertionError(f"no training progress; launcher log:\n{handle.log_path.read_text()[-3000:]}")


def _run_to_the_end(config: TrainConfig, timeout: float = 400):
    """Launch ``config`` on 2 gloo ranks and wait for it; returns the handle and its launcher log."""
    handle = launcher.launch_multi(config, cpu=True)
    try:
        rc = handle.wait(timeout)
    finally:
        if handle.poll() is None:
            handle.kill()
    log_text = handle.log_path.read_text()
    assert rc == 0, log_text[-3000:]
    return handle, log_text


@pytest.mark.slow
def test_two_process_gloo_run_cancel_stops_every_rank_at_one_step_then_all_ranks_resume(demo_model, tmp_path):
    """A real 2-rank DDP run on CPU: one run directory written by rank 0 only, data split over the
    ranks, a cancel seen by rank 0 alone stops both ranks at the same step (collective), and a
    resume from 'last' restarts every rank from the same checkpoint."""
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config, _ = TrainConfig.from_dict(dict(
        model_name_or_path="demo", dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=400,
        per_device_train_batch_size=2, precision="fp32", devices="cpu", num_processes=2, cutoff_len=64,
        save_steps=4, logging_steps=1, learning_rate=1e-3))
    handle = launcher.launch_multi(config, cpu=True)
    try:
        _wait_for_step(handle, 6)
        rc = handle.cancel(grace_s=120)  # only rank 0 watches the CANCEL file
    finally:
        if handle.poll() is None:
            handle.kill()
    log_text = handle.log_path.read_text()
    assert rc == 0, log_text[-3000:]
    ends = _rank_lines(log_text)
    assert set(ends) == {0, 1} and ends[0] == ends[1] and ends[0].startswith("cancelled at step"), ends
    stopped_at = int(ends[0].split()[3])
    run = Path(handle.output_dir)
    events, _ = read_events(run / "events.jsonl")
    world = [e for e in events if e["event"] == "log" and "world_size" in e]
    assert world and world[0]["world_size"] == 2 and world[0]["backend"] == "gloo"
    assert sum(e["event"] == "training_start" for e in events) == 1  # only rank 0 writes the events
    # 16 samples / (2 per rank x 2 ranks) = 4 steps per epoch: the data really is split over the ranks
    step6 = next(e for e in events if e["event"] == "metric_update" and e["step"] == 6)
    assert step6["epoch"] == pytest.approx(1.5, abs=0.01)
    meta = json.loads((run / "finetune_meta.json").read_text())
    assert meta["status"] == "cancelled" and meta["metrics"]["global_step"] == stopped_at
    assert (run / "lora" / "adapter_config.json").exists()
    assert not list(run.glob(".rank-*")) and not list(run.glob("*.tmp"))  # no scratch or half-saved folders
    last = max(int(p.name.split("-")[1]) for p in run.glob("checkpoint-*"))
    assert (run / f"checkpoint-{last}" / "rng_state_1.pth").exists()  # every rank's state is in the checkpoint

    _, resumed_log = _run_to_the_end(dataclasses.replace(config, resume_from_checkpoint="last", max_steps=last + 2))
    ends = _rank_lines(resumed_log[len(log_text):])
    assert ends == {r: f"completed at step {last + 2} (resumed from checkpoint-{last})" for r in (0, 1)}, ends
    assert json.loads((run / "finetune_meta.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_two_process_run_with_micro_batches_by_tokens_completes_when_ranks_take_different_pass_counts(
        demo_model, tmp_path):
    """batch 1 x accumulation 4 split by tokens on 2 gloo ranks: in every epoch one rank gets the group
    of the 4 shortest samples (1 pass) while the other gets a longer group (2-4 passes). Gradients sync on
    each rank's last pass only, so the ranks' collectives still pair up: the run completes (no hang),
    and the token count gathered from both ranks is exact."""
    from transformers import AutoTokenizer

    from sage_ft.data.tokenize import tokenize_conversations

    words = "alpha beta gamma delta river stone cloud light north quiet".split()
    rows = [{"instruction": "hi", "output": "ok"} for _ in range(4)]
    rows += [{"instruction": " ".join(words[(i + j) % 10] for j in range(20 + i)), "output": "yes"} for i in range(12)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = tokenize_conversations([[{"role": "user", "content": r["instruction"]},
                                       {"role": "assistant", "content": r["output"]}] for r in rows],
                                      AutoTokenizer.from_pretrained(demo_model), 128)
    lengths = sorted(len(s["input_ids"]) for s in samples)
    assert len(lengths) == 16 and lengths[3] <= lengths[-1] // 4 < lengths[4]  # the precondition above
    config, _ = TrainConfig.from_dict(dict(
        model_name_or_path="demo", dataset=str(data), output_dir=str(tmp_path / "run"), max_steps=4,
        per_device_train_batch_size=1, gradient_accumulation_steps=4, micro_batch_by_tokens="on",
        precision="fp32", devices="cpu", num_processes=2, cutoff_len=128, save_steps=100, logging_steps=1))
    handle, log_text = _run_to_the_end(config)
    assert _rank_lines(log_text) == {r: "completed at step 4" for r in (0, 1)}, log_text[-3000:]
    meta = json.loads((Path(handle.output_dir) / "finetune_meta.json").read_text())
    # 16 samples / (4 per rank x 2 ranks) = 2 steps per epoch: 4 steps see every sample twice
    assert meta["metrics"]["tokens_seen"] == 2 * sum(lengths)
    assert 1 < meta["metrics"]["micro_batches_per_step"] <= 4  # rank 0's own passes


@pytest.mark.slow
def test_two_process_run_with_torch_compile_trains_the_same_losses_as_eager(demo_model, tmp_path):
    """Regional torch.compile under DDP (2 gloo ranks): every rank compiles its decoder layers, gradients
    are still all-reduced, so the per-step losses equal an eager 2-rank run's."""
    rows = [{"instruction": f"What is {i} plus {i}?", "output": f"It is {2 * i}."} for i in range(16)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def losses(name: str, compiled: bool) -> tuple[list[float], dict]:
        config, _ = TrainConfig.from_dict(dict(
            model_name_or_path="demo", dataset=str(data), output_dir=str(tmp_path / name), max_steps=4,
            per_device_train_batch_size=2, precision="fp32", devices="cpu", num_processes=2, cutoff_len=64,
            save_steps=100, logging_steps=1, torch_compile=compiled))
        handle, log_text = _run_to_the_end(config, timeout=600)
        assert _rank_lines(log_text) == {r: "completed at step 4" for r in (0, 1)}, log_text[-3000:]
        run = Path(handle.output_dir)
        events, _ = read_events(run / "events.jsonl")
        meta = json.loads((run / "finetune_meta.json").read_text())
        return [e["loss"] for e in events if e["event"] == "metric_update" and "loss" in e], meta

    eager, _ = losses("eager", compiled=False)
    compiled, meta = losses("compiled", compiled=True)
    assert meta["torch_compile_layers"] == 2  # the demo model's decoder layers, compiled on rank 0 (and 1)
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=1e-4)
