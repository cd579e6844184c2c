"""What hardware this machine offers for training: NVIDIA GPUs through NVML, else the CPU and its RAM.

``device_info()`` is polled by the UI every couple of seconds, so it is cheap (NVML queries, one
``psutil.virtual_memory()``; static facts are cached) and never raises: a missing pynvml, a missing
driver or a driver/library mismatch all become CPU mode with the reason in ``cpu_reason``. It does
not import torch.

The memory estimator and recommender live in ``sage_ft.estimate``; ``estimate_memory``,
``recommend`` and ``check_fit`` are also reachable from here (lazily) as docs/architecture.md lists.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading
import time
from pathlib import Path
from typing import Any

_NVML_RETRY_S = 30.0  # after a failed NVML init, retry at most this often (a driver may appear later)
_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {"ok": False, "error": None, "checked": 0.0}


def _init_nvml() -> tuple[Any | None, str | None]:
    """The pynvml module once ``nvmlInit`` succeeded, else (None, why not)."""
    with _nvml_lock:
        if _nvml_state["ok"]:
            import pynvml

            return pynvml, None
        if _nvml_state["checked"] and time.monotonic() - _nvml_state["checked"] < _NVML_RETRY_S:
            return None, _nvml_state["error"]
        _nvml_state["checked"] = time.monotonic()
        try:
            import pynvml
        except ImportError:
            _nvml_state["error"] = "pynvml is not installed (pip install nvidia-ml-py)"
            return None, _nvml_state["error"]
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, mismatch, ...
            _nvml_state["error"] = f"NVIDIA driver not usable ({type(exc).__name__}: {exc})"
            return None, _nvml_state["error"]
        _nvml_state.update(ok=True, error=None)
        return pynvml, None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _gpu(nvml: Any, index: int) -> dict[str, Any]:
    """One GPU's facts; a query the driver does not support becomes None instead of an error."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)

    def ask(fn, *args, default=None):
        try:
            return fn(handle, *args)
        except Exception:
            return default

    mem = ask(nvml.nvmlDeviceGetMemoryInfo)
    util = ask(nvml.nvmlDeviceGetUtilizationRates)
    capability = ask(nvml.nvmlDeviceGetCudaComputeCapability)
    processes = []
    for proc in ask(nvml.nvmlDeviceGetComputeRunningProcesses, default=[]) or []:
        used = getattr(proc, "usedGpuMemory", None)
        processes.append({"pid": int(proc.pid), "used_memory": int(used) if used is not None else None,
                          "name": _process_name(int(proc.pid))})
    return {
        "index": index,
        "name": _text(ask(nvml.nvmlDeviceGetName, default="NVIDIA GPU")),
        "uuid": _text(ask(nvml.nvmlDeviceGetUUID, default="")),
        "memory_total": int(mem.total) if mem else None,
        "memory_used": int(mem.used) if mem else None,
        "memory_free": int(mem.free) if mem else None,
        "utilization": int(util.gpu) if util else None,
        "temperature": ask(nvml.nvmlDeviceGetTemperature, 0),  # 0 = NVML_TEMPERATURE_GPU
        "compute_capability": f"{capability[0]}.{capability[1]}" if capability else None,
        "bf16": bool(capability and capability[0] >= 8),
        "processes": processes,
    }


def _process_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@functools.cache
def _cpu_static() -> dict[str, Any]:
    """CPU facts that do not change while the process runs (read once)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            if model and flags:
                break
    except OSError:
        pass
    if not model:
        import platform

        model = platform.processor() or platform.machine()
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"model_name": model, "count": count, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags}


def cpu_info() -> dict[str, Any]:
    """CPU model, usable cores, bf16 support and RAM (total/available bytes)."""
    import psutil

    mem = psutil.virtual_memory()
    static = _cpu_static()
    return {**static, "bf16": static["avx512_bf16"] or static["amx_bf16"],
            "ram_total": int(mem.total), "ram_available": int(mem.available)}


def device_info() -> dict[str, Any]:
    """Everything the UI's device panel and the recommender need; never raises.

    Keys: ``mode`` ("gpu" | "cpu"), ``gpus`` (list of per-GPU dicts: index, name, uuid,
    memory_total/used/free in bytes, utilization %, temperature °C, compute_capability, bf16,
    processes [{pid, used_memory, name}]), ``cpu`` (model_name, count, avx512_bf16, bf16,
    ram_total, ram_available), ``driver_version``, ``cpu_reason`` (why CPU mode, else None).
    """
    info: dict[str, Any] = {"mode": "cpu", "gpus": [], "cpu": cpu_info(), "driver_version": None,
                            "cpu_reason": None}
    nvml, why = _init_nvml()
    if nvml is None:
        info["cpu_reason"] = why
        return info
    try:
        count = nvml.nvmlDeviceGetCount()
        info["driver_version"] = _text(nvml.nvmlSystemGetDriverVersion())
        info["gpus"] = [_gpu(nvml, i) for i in range(count)]
    except Exception as exc:  # e.g. a GPU fell off the bus between polls
        info["cpu_reason"] = f"NVML query failed ({type(exc).__name__}: {exc})"
        info["gpus"] = []
        return info
    if info["gpus"]:
        info["mode"] = "gpu"
    else:
        info["cpu_reason"] = "the NVIDIA driver reports no GPUs"
    return info


def gpu_count() -> int:
    """Number of NVIDIA GPUs the driver reports (no torch import; 0 without a usable driver)."""
    nvml, _ = _init_nvml()
    if nvml is None:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception:
        return 0


def gpu_memory(index: int = 0) -> tuple[int, int] | None:
    """``(free, total)`` bytes of GPU ``index`` now, or None without a usable NVIDIA driver (cheap: one query)."""
    nvml, _ = _init_nvml()
    if nvml is None:
        return None
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
    except Exception:  # no such GPU, or it fell off the bus
        return None
    return int(mem.free), int(mem.total)


def selected_gpus(info: dict[str, Any], devices: str = "auto") -> list[dict[str, Any]]:
    """The GPUs a config's ``devices`` value ('auto', 'cpu', '0,1') selects from ``info``."""
    if info.get("mode") != "gpu" or devices.strip().lower() == "cpu":
        return []
    gpus = info["gpus"]
    if devices.strip().lower() in ("auto", "", "all"):
        return gpus
    wanted = {int(d) for d in devices.replace(" ", "").split(",") if d.isdigit()}
    return [g for g in gpus if g["index"] in wanted]


# Model types whose loss liger-kernel (a maintained library of fused Triton kernels, the `gpu`
# extra) computes as a fused linear cross-entropy: the logits (tokens x vocab, the largest activation
# of small models with big vocabularies) are never materialised. One list for the trainer and the
# memory estimator, so the estimate assumes the fused loss exactly when training will use it.
LIGER_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                               "gemma2", "phi3", "granite", "olmo2"})


def fused_cross_entropy_available(model_type: str, device: str) -> bool:
    """True when training on ``device`` uses liger's fused linear cross-entropy (CUDA, liger installed).

    Checked with ``find_spec`` so the estimator stays torch-free.
    """
    return device == "cuda" and model_type in LIGER_MODEL_TYPES and importlib.util.find_spec("liger_kernel") is not None


def summary(info: dict[str, Any]) -> str:
    """One human line per device, for the CLI and the UI's status bar."""
    gib = 1024**3
    if info.get("mode") == "gpu":
        lines = []
        for g in info["gpus"]:
            mem = (f"{g['memory_used'] / gib:.1f}/{g['memory_total'] / gib:.1f} GiB"
                   if g["memory_total"] else "memory n/a")
            extra = "".join([f", {g['utilization']}% busy" if g["utilization"] is not None else "",
                             f", {g['temperature']}°C" if g["temperature"] is not None else ""])
            lines.append(f"GPU {g['index']}: {g['name']} — {mem}{extra}, {len(g['processes'])} process(es)")
        return "\n".join(lines)
    cpu = info["cpu"]
    return (f"CPU mode: {cpu['model_name']}, {cpu['count']} cores, "
            f"RAM {cpu['ram_available'] / gib:.1f} of {cpu['ram_total'] / gib:.1f} GiB free, "
            f"bf16 {'yes' if cpu['bf16'] else 'no'}" + (f" ({info['cpu_reason']})" if info.get("cpu_reason") else ""))


def __getattr__(name: str) -> Any:
    """``sage_ft.gpu.estimate_memory`` etc. without importing the estimator on every device poll."""
    if name in ("estimate_memory", "recommend", "check_fit", "MemoryEstimate", "Recommendation", "FitReport"):
        from sage_ft import estimate

        return getattr(estimate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
