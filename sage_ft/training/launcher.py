"""Data-parallel runs: ``accelerate launch`` as a child process, and multi-node / vLLM parallel settings.

A run with ``num_processes > 1`` (or several GPU ids in ``devices``) cannot run on the app's
training thread: DDP needs one process per device. ``launch_multi(config)`` starts
``accelerate launch ... -m sage_ft.training.worker_entry <run>/launch_config.yaml`` in its own
process group and returns a ``MultiProcessRun`` handle. Rank 0 writes the usual run directory
(``events.jsonl``, ``finetune_meta.json``, ``lora/``...), so the task manager and the UI follow it
exactly like an in-process run.

Cancel path: ``handle.cancel()`` writes ``<run>/CANCEL``; every rank watches for it and stops after
the current step (the adapter is saved); after ``grace_s`` the whole process group gets SIGTERM,
then SIGKILL, and so does every rank recorded under ``<run>/ranks/`` (torchrun gives each rank a
session of its own) — a multi-process run can always be stopped (LLaMA-Factory #3978).

On CPU, accelerate's ``--cpu`` launcher starts a single process (several only through MPI), so
CPU data parallelism uses the same torchrun path as GPUs (``--multi_gpu``); the trainer's
``use_cpu=True`` makes accelerate pick the gloo backend.

Beyond one machine: ``write_multinode_config`` writes an accelerate config file to start the same
command on each machine; ``vllm_parallel_args`` gives the serving side its tensor/pipeline sizes.
argv lists only, never shell strings.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from sage_ft.config import ConfigError, TrainConfig, devices_problem
from sage_ft.config import gpu_ids as parse_gpu_ids
from sage_ft.filetail import tail_lines

CANCEL_FILE = "CANCEL"
LAUNCH_CONFIG = "launch_config.yaml"
LAUNCHER_LOG = "launcher.log"
RANKS_DIR = "ranks"  # each rank writes rank-N.json (pid + start time) here when it starts
WORKER_MODULE = "sage_ft.training.worker_entry"


def gpu_ids(config: TrainConfig) -> list[int]:
    """GPU ids named in ``config.devices`` ('0,1' -> [0, 1]); [] for 'auto' and 'cpu' (validated by
    ``TrainConfig.validate``, so a config that got here names ids or neither)."""
    ids = parse_gpu_ids(config.devices)
    if ids is None:
        raise ConfigError([devices_problem(config.devices)])
    return ids


def process_count(config: TrainConfig) -> int:
    """Processes the run needs: ``num_processes`` if > 1, else one per listed GPU."""
    return config.num_processes if config.num_processes > 1 else max(1, len(gpu_ids(config)))


def needs_multi_process(config: TrainConfig) -> bool:
    return process_count(config) > 1


def launch_argv(config: TrainConfig, config_path: str | Path, *, cpu: bool | None = None,
                main_process_port: int = 0, accelerate_config: str | Path | None = None) -> list[str]:
    """The ``accelerate launch`` command for ``config`` (saved at ``config_path``), as an argv list.

    ``cpu`` (default: ``devices == 'cpu'`` or no CUDA GPU visible through NVML) picks gloo DDP on
    CPU. ``main_process_port=0`` lets accelerate pick a free port. With ``accelerate_config`` (a
    multi-node file from ``write_multinode_config``) the topology comes from that file.
    """
    launch = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config is not None:
        return [*launch, "--config_file", str(accelerate_config), "-m", WORKER_MODULE, str(config_path)]
    n = process_count(config)
    if cpu is None:
        cpu = _cpu_only(config)
    argv = [*launch, "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(main_process_port)]
    if n > 1:
        argv.append("--multi_gpu")  # torchrun path: one process per rank (CPU too, see module docstring)
    if cpu:
        threads = max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // n)
        argv += ["--num_cpu_threads_per_process", str(threads)]
    elif gpu_ids(config):
        argv += ["--gpu_ids", ",".join(map(str, gpu_ids(config)))]
    return [*argv, "-m", WORKER_MODULE, str(config_path)]


def _cpu_only(config: TrainConfig) -> bool:
    if config.devices.strip().lower() == "cpu":
        return True
    from sage_ft.gpu import device_info

    return device_info()["mode"] != "gpu"


def launch_env(config: TrainConfig, cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # never touch a GPU in a CPU run
    return env


class MultiProcessRun:
    """Handle of a launched data-parallel run: ``poll/wait/cancel/kill``, ``pid``, ``output_dir``."""

    def __init__(self, process: subprocess.Popen, output_dir: Path, argv: list[str], config_path: Path):
        self.process = process
        self.output_dir = output_dir
        self.argv = argv
        self.config_path = config_path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def events_path(self) -> Path:
        return self.output_dir / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.output_dir / LAUNCHER_LOG

    def poll(self) -> int | None:
        return self.process.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def request_cancel(self) -> None:
        """Ask every rank to stop after its current step (the adapter is saved)."""
        request_cancel(self.output_dir)

    def cancel(self, grace_s: float = 60.0) -> int:
        """Graceful stop, escalating to SIGTERM then SIGKILL of the process group; returns the exit code."""
        self.request_cancel()
        try:
            return self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        self._signal(signal.SIGKILL)
        code = self.process.wait()
        self.end_all(grace_s=0)
        return code

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)  # the launcher and every rank share this group
        except ProcessLookupError:
            pass

    def rank_processes(self) -> list[Any]:
        """The ranks as they recorded themselves (``ranks/rank-N.json``: pid + start time).

        torchrun starts every rank in a session of its own, so signalling the launcher's process
        group never reaches them; these records do, and a reused pid is never mistaken for a rank.
        """
        from sage_ft.tasks.procinfo import ProcessIdentity

        found = []
        for path in sorted((self.output_dir / RANKS_DIR).glob("rank-*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                found.append(ProcessIdentity(int(record["pid"]), float(record["start_time"])))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def end_all(self, grace_s: float = 10.0) -> bool:
        """After the launcher exited: end every rank still running (SIGTERM, then SIGKILL after
        ``grace_s``). A launcher killed with -9 leaves its ranks training on, unsupervised; they
        must not go on writing into the run directory. Returns True when something had to be ended.

        Only the recorded ranks are signalled (each checked by pid + start time), never the
        launcher's process group: once the launcher is reaped its number may belong to another
        process group."""
        from sage_ft.tasks.procinfo import end_process_tree

        return any([end_process_tree(rank, timeout_s=grace_s) for rank in self.rank_processes()])

    def failure_reason(self, exit_code: int) -> str:
        """Why the launcher ended with ``exit_code``, in one line (see ``describe_failure``)."""
        return describe_failure(exit_code, self.log_path, self.pid)

    def log_tail(self, lines: int = 40, max_bytes: int = 32 * 1024) -> str:
        """The last ``lines`` lines of ``launcher.log`` (every rank's output and torchrun's report)."""
        try:
            return tail_lines(self.log_path, lines, max_bytes)
        except OSError:
            return ""


# torchrun's ChildFailedError report names the first rank that failed under "Root Cause".
_ROOT_CAUSE_RE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)\s*\(pid:\s*(\d+)\)", re.S)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def describe_failure(exit_code: int, log_path: Path, launcher_pid: int) -> str:
    """One line naming what ended a data-parallel run: the rank torchrun reports as the root cause
    (its pid and signal or exit code), else the launcher's own exit. Users otherwise see only the
    surviving rank's secondary error ("Connection reset by peer") and have to dig for the cause."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")[-64 * 1024:]
    except OSError:
        text = ""
    found = _ROOT_CAUSE_RE.search(text)
    if found:
        rank, code, pid = int(found.group(1)), int(found.group(2)), int(found.group(3))
        return f"training process rank {rank} (pid {pid}) {_exit_text(code)}; the run stopped"
    return f"the launcher process (pid {launcher_pid}) {_exit_text(exit_code)}; the run stopped"


def request_cancel(output_dir: str | Path) -> Path:
    path = Path(output_dir) / CANCEL_FILE
    path.write_text(f"{time.time()}\n", encoding="utf-8")
    return path


def prepare_launch(config: TrainConfig) -> tuple[TrainConfig, Path]:
    """Fix the run directory once (ranks must agree on it) and save the config every rank loads.

    The parent validates ``output_dir`` with the trainer's own rule; the saved copy then allows the
    existing directory, because it now holds this launch's own files.
    """
    import dataclasses

    from sage_ft.training.run import resolve_output_dir

    out = resolve_output_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    (out / CANCEL_FILE).unlink(missing_ok=True)
    for stale in (out / RANKS_DIR).glob("rank-*.json"):  # a previous launch into this directory
        stale.unlink()
    frozen = dataclasses.replace(config, output_dir=str(out), overwrite_output_dir=True)
    path = frozen.save_yaml(out / LAUNCH_CONFIG)
    return frozen, path


def launch_multi(config: TrainConfig, *, main_process_port: int = 0, cpu: bool | None = None,
                 accelerate_config: str | Path | None = None) -> MultiProcessRun:
    """Start the data-parallel run of ``config`` and return at once (output in ``<run>/launcher.log``)."""
    config.validate()
    if cpu is None:
        cpu = _cpu_only(config)
    frozen, config_path = prepare_launch(config)
    argv = launch_argv(frozen, config_path, cpu=cpu, main_process_port=main_process_port,
                       accelerate_config=accelerate_config)
    out = Path(frozen.output_dir)
    with (out / LAUNCHER_LOG).open("ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=launch_env(frozen, cpu), start_new_session=True)
    return MultiProcessRun(process, out, argv, config_path)


# ---------------------------------------------------------------------------------------- multi-node
def write_multinode_config(num_machines: int, machine_rank: int, main_process_ip: str,
                           main_process_port: int = 29500, *, processes_per_machine: int = 1,
                           gpu_ids: str = "all", mixed_precision: str = "no", path: str | Path | None = None,
                           same_network: bool = True) -> Path:
    """Write the accelerate config for machine ``machine_rank`` of ``num_machines``; returns its path.

    Run ``launch_argv(config, config_path, accelerate_config=path)`` on every machine with its own
    ``machine_rank`` (0 = the main one at ``main_process_ip:main_process_port``). ``num_processes``
    in the file is the total over all machines, as accelerate expects.
    """
    problems = []
    if num_machines < 1:
        problems.append(f"num_machines: {num_machines}; must be >= 1")
    if not 0 <= machine_rank < max(1, num_machines):
        problems.append(f"machine_rank: {machine_rank}; must be between 0 and num_machines - 1 ({num_machines - 1})")
    if not main_process_ip.strip():
        problems.append("main_process_ip: empty; give the address of machine 0 reachable from every machine")
    if not 1 <= main_process_port <= 65535:
        problems.append(f"main_process_port: {main_process_port}; must be 1-65535")
    if processes_per_machine < 1:
        problems.append(f"processes_per_machine: {processes_per_machine}; must be >= 1 (usually GPUs per machine)")
    if mixed_precision not in ("no", "fp16", "bf16"):
        problems.append(f"mixed_precision: {mixed_precision!r}; choose no, fp16 or bf16")
    if problems:
        raise ConfigError(problems)
    data: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": num_machines,
        "machine_rank": machine_rank,
        "main_process_ip": main_process_ip,
        "main_process_port": main_process_port,
        "num_processes": num_machines * processes_per_machine,
        "gpu_ids": gpu_ids,
        "mixed_precision": mixed_precision,
        "rdzv_backend": "static",
        "same_network": same_network,
        "main_training_function": "main",
        "downcast_bf16": "no",
        "use_cpu": False,
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "tpu_env": [],
    }
    if path is None:
        from sage_ft import paths

        path = paths.home() / "accelerate" / f"multinode-{num_machines}x{processes_per_machine}-rank{machine_rank}.yaml"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def vllm_parallel_args(tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, *,
                       gpus_per_node: int | None = None, num_attention_heads: int | None = None,
                       num_hidden_layers: int | None = None) -> list[str]:
    """vLLM server flags that split one model over several GPUs (and nodes, through Ray).

    Tensor parallel splits every layer (heads must divide evenly) — use it within a node; pipeline
    parallel splits the layer stack — use it across nodes. When tp x pp exceeds the GPUs of one node,
    vLLM needs its Ray backend (start a Ray cluster over the nodes first, as vLLM's docs describe).
    """
    problems = []
    if tensor_parallel_size < 1 or pipeline_parallel_size < 1:
        problems.append(f"tensor/pipeline parallel sizes must be >= 1 (got {tensor_parallel_size}, "
                        f"{pipeline_parallel_size})")
    if num_attention_heads and tensor_parallel_size > 0 and num_attention_heads % tensor_parallel_size:
        problems.append(f"tensor_parallel_size {tensor_parallel_size} does not divide the model's "
                        f"{num_attention_heads} attention heads; choose a divisor")
    if num_hidden_layers and pipeline_parallel_size > num_hidden_layers:
        problems.append(f"pipeline_parallel_size {pipeline_parallel_size} exceeds the model's {num_hidden_layers} layers")
    if problems:
        raise ConfigError(problems)
    args = ["--tensor-parallel-size", str(tensor_parallel_size), "--pipeline-parallel-size", str(pipeline_parallel_size)]
    world = tensor_parallel_size * pipeline_parallel_size
    if world > 1:
        multi_node = gpus_per_node is not None and world > gpus_per_node
        args += ["--distributed-executor-backend", "ray" if multi_node else "mp"]
    return args
