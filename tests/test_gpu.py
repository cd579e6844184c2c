"""Device info on this GPU-less machine: CPU mode with real RAM numbers, never an exception."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sage_ft import gpu
from sage_ft.gpu import device_info, selected_gpus, summary


def test_cpu_mode_reports_ram_and_reason():
    info = device_info()
    assert info["mode"] == "cpu"
    assert info["gpus"] == []
    assert info["cpu_reason"]  # why there is no GPU (no NVML library here)
    cpu = info["cpu"]
    assert cpu["count"] >= 1 and cpu["model_name"]
    assert 0 < cpu["ram_available"] <= cpu["ram_total"]
    assert isinstance(cpu["avx512_bf16"], bool)
    assert "CPU mode" in summary(info)
    json.dumps(info)  # the UI and `sage-ft gpu --json` serialise it as is


def test_polling_is_cheap_and_stable():
    first = device_info()
    for _ in range(50):  # the UI polls every 2 s; 50 polls must not fail or change the static facts
        again = device_info()
    assert again["cpu"]["model_name"] == first["cpu"]["model_name"]
    assert again["mode"] == first["mode"]


def test_missing_pynvml_is_cpu_mode_not_an_error(tmp_path):
    """A Python where `import pynvml` fails (shadowed by a broken module) still gets CPU mode."""
    (tmp_path / "pynvml.py").write_text("raise ImportError('no NVML bindings here')\n")
    code = "import json; from sage_ft.gpu import device_info; print(json.dumps(device_info()))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    info = json.loads(out.stdout)
    assert info["mode"] == "cpu"
    assert "pynvml is not installed" in info["cpu_reason"]


def test_nvml_init_failure_is_cpu_mode(tmp_path):
    """An NVML whose init raises (driver/library mismatch) gives CPU mode with the reason."""
    (tmp_path / "pynvml.py").write_text(
        "class NVMLError_DriverNotLoaded(Exception):\n    pass\n"
        "def nvmlInit():\n    raise NVMLError_DriverNotLoaded('Driver Not Loaded')\n")
    code = "import json; from sage_ft.gpu import device_info; print(json.dumps(device_info()))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    info = json.loads(out.stdout)
    assert info["mode"] == "cpu"
    assert "Driver Not Loaded" in info["cpu_reason"]


def test_gpu_count_and_memory_read_the_driver_and_never_raise(tmp_path):
    """``gpu_count``/``gpu_memory`` (what the chat server's GPU mode and fit checks use): 0/None here, the
    driver's figures where one answers, None for a GPU the driver does not have."""
    assert gpu.gpu_count() == 0 and gpu.gpu_memory() is None  # this machine: no NVIDIA driver
    (tmp_path / "pynvml.py").write_text(
        "class _Mem:\n    free, total, used = 30 * 2**30, 80 * 2**30, 50 * 2**30\n"
        "def nvmlInit():\n    pass\n"
        "def nvmlDeviceGetCount():\n    return 1\n"
        "def nvmlDeviceGetHandleByIndex(i):\n    if i != 0:\n        raise RuntimeError('Invalid Argument')\n    return i\n"
        "def nvmlDeviceGetMemoryInfo(handle):\n    return _Mem()\n")
    code = "from sage_ft.gpu import gpu_count, gpu_memory; print(gpu_count(), gpu_memory(0), gpu_memory(1))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split("\n")[0] == f"1 ({30 * 2**30}, {80 * 2**30}) None"


def test_selected_gpus_follows_devices():
    info = {"mode": "gpu", "gpus": [{"index": 0}, {"index": 1}, {"index": 2}], "cpu": {}}
    assert [g["index"] for g in selected_gpus(info, "auto")] == [0, 1, 2]
    assert [g["index"] for g in selected_gpus(info, "0,2")] == [0, 2]
    assert selected_gpus(info, "cpu") == []
    assert selected_gpus(device_info(), "0") == []  # no GPU on this machine


def test_cli_gpu_json_and_text(capsys):
    from sage_ft.cli import main

    assert main(["gpu", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"]["mode"] == "cpu"
    assert main(["gpu", "--set", "per_device_train_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert "estimated peak" in out and "CPU mode" in out


def test_estimator_reachable_from_gpu_module():
    assert gpu.estimate_memory.__module__ == "sage_ft.estimate"
