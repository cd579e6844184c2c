"""One managed vLLM OpenAI-compatible server child: start, readiness, log, stop, crash detection.

The child runs ``python -m vllm.entrypoints.openai.api_server`` in its own session (process group),
bound to 127.0.0.1 with a random API key, its stdout/stderr going to a log file under the data home.
Ending it always ends the whole group (API server, engine core, workers), so a failed or timed-out
start never leaves orphans. Readiness is verified: ``/health`` answers 200 *and* ``/v1/models``
lists the served name we asked for, so we never chat with some other model that happens to answer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from sage_ft import gpu, paths, process_start
from sage_ft.serving import registry
from sage_ft.serving.metrics import ServerMetrics, server_metrics
from sage_ft.serving.ports import LOOPBACK

log = logging.getLogger(__name__)

HTTP_TIMEOUT_S = 5.0  # every control-plane call is bounded; nothing may hang
ADAPTER_LOAD_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0


class ServerStartError(RuntimeError):
    """The server did not become ready; ``log_tail`` holds the end of its log."""

    def __init__(self, message: str, log_tail: str = "", log_path: str | None = None):
        super().__init__(message)
        self.log_tail = log_tail
        self.log_path = log_path


class StartCancelled(ServerStartError):
    """A switch was cancelled (``ServerManager.cancel_switch``): its half-started server was ended, its
    adapter merge for serving stopped between stages with nothing written, or its in-process load dropped."""


class AdapterLoadError(RuntimeError):
    """vLLM refused an adapter (message from the server; ``status`` is the HTTP code)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class StartProgress:
    """One start-up progress report for the caller (UI status line, CLI spinner). Shown as our stage
    name only: vLLM's own log lines (warnings about Triton, model runners ...) mean nothing to a user
    waiting for a switch; ``last_log_line`` stays available for a log view."""

    stage: str
    elapsed_s: float
    last_log_line: str = ""

    def __str__(self) -> str:
        return f"[{self.elapsed_s:5.1f}s] {self.stage}"


ProgressCallback = Callable[[StartProgress], None]

# (pattern in a log line, stage reached) — vLLM 0.11 .. 0.32 wording
_STAGES = (
    (re.compile(r"non-default args|vLLM API server version"), "reading model config"),
    (re.compile(r"Initializing a V1 LLM engine|Initializing an LLM engine"), "starting engine"),
    (re.compile(r"Starting to load model"), "loading weights"),
    (re.compile(r"Loading weights took|Model loading took"), "allocating KV cache"),
    (re.compile(r"init engine|KV cache size|Graph capturing|torch.compile"), "warming up"),
    (re.compile(r"Starting vLLM (API )?server on|Application startup complete"), "opening HTTP port"),
)
_ERROR_LINE = re.compile(r"(Error\b|Exception\b|[Ee]rror[:,]|No such file|not found|does not exist|not supported)")
# "(APIServer pid=14354) ERROR 12-06 13:20:31 [file.py:335] " before vLLM's own message
_VLLM_PREFIX = re.compile(r"^(\(\w+ pid=\d+\)\s*)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?"
                          r"\s+(\[[^\]]*\]\s*)?")
_ERROR_RECORD = re.compile(r"^(\(\w+ pid=\d+\)\s*)?(ERROR|CRITICAL)\b")
_EXCEPTION_LINE = re.compile(r"^(\(\w+ pid=\d+\)\s*)?[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b(:|$)")
_NOISE_LINE = re.compile(r"^\s*(File \"|raise |Traceback|For further information|\^)|warnings\.warn|UserWarning")


@dataclass
class ServerSpec:
    """How to launch one server. ``served_name`` is what ``/v1/models`` must list."""

    model_path: str
    served_name: str
    port: int
    max_model_len: int | None = None  # None: vLLM's "auto" (the model's own context, as far as KV memory holds)
    dtype: str = "auto"
    gpu_memory_utilization: float | None = None  # None: 0.3 on CPU, 0.85 on a GPU
    enable_lora: bool = True
    max_lora_rank: int = 16
    max_loras: int = 4
    max_cpu_loras: int | None = None
    enable_sleep_mode: bool = False
    enforce_eager: bool = False
    extra_args: list[str] = field(default_factory=list)

    def argv(self, on_gpu: bool) -> list[str]:
        """The child's command line. The API key is NOT on it (any local user can read argv with
        ``ps``); it travels in the child's environment as ``VLLM_API_KEY``, which vLLM reads."""
        util = self.gpu_memory_utilization or (0.85 if on_gpu else 0.3)
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                "--model", self.model_path, "--served-model-name", self.served_name,
                "--host", LOOPBACK, "--port", str(self.port),
                "--max-model-len", str(self.max_model_len or "auto"), "--dtype", self.dtype,
                "--gpu-memory-utilization", str(util), "--disable-uvicorn-access-log"]
        if self.enable_lora:
            argv += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank),
                     "--max-loras", str(self.max_loras),
                     "--max-cpu-loras", str(max(self.max_cpu_loras or 2 * self.max_loras, self.max_loras))]
        if self.enable_sleep_mode and on_gpu:
            argv.append("--enable-sleep-mode")
        if self.enforce_eager:
            argv.append("--enforce-eager")
        return argv + list(self.extra_args)


def child_env(on_gpu: bool, sleep_mode: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not on_gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default would take far more
        if (os.cpu_count() or 1) <= 4:
            # 'auto' pins every server's worker to the same core; with two servers during a zero-downtime
            # switch (or other busy processes) on a small machine, the OS scheduler does far better.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if sleep_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /sleep and /wake_up (loopback + API key only)
    return env


class VLLMServer:
    """A single vLLM child. Thread-safe enough for one owner plus a watcher thread."""

    def __init__(self, spec: ServerSpec, api_key: str | None = None, log_path: Path | None = None,
                 meta: dict[str, Any] | None = None):
        self.spec = spec
        self.api_key = api_key or secrets.token_urlsafe(24)
        self.log_path = Path(log_path) if log_path else (
            paths.logs_dir() / f"vllm-{spec.served_name}-{spec.port}-{time.strftime('%Y%m%d-%H%M%S')}.log")
        self.meta = dict(meta or {})  # what the manager wants recorded (kind, base, adapters)
        self.pid: int | None = None
        self.create_time: float | None = None
        self.started_at: float | None = None
        self.ready_at: float | None = None
        self.context_len: int | None = None  # the context vLLM settled on (``/v1/models``), once ready
        self.on_gpu = gpu.gpu_count() > 0
        self._proc: subprocess.Popen | None = None
        self._log_fh = None
        self._lifecycle = threading.Lock()  # launch vs stop: a server stopped before it launched never launches
        self._stopping = False
        self.owned = True  # False: a server another live sage-ft process started (we only chat with it)

    # ---- addresses -------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def root_url(self) -> str:
        return f"http://{LOOPBACK}:{self.spec.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    # ---- life cycle ------------------------------------------------------------------------
    def launch(self) -> None:
        """Spawn the child (returns at once) and record it in the registry; refused once ``stop`` was
        called (the app exiting while another thread starts this server must not leave a child behind)."""
        with self._lifecycle:
            if self._stopping:
                raise StartCancelled(f"the start of {self.spec.model_path} was stopped before vLLM was launched",
                                     "", str(self.log_path))
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_fh = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed in _cleanup
            argv = self.spec.argv(self.on_gpu)
            self._log_fh.write(f"$ {' '.join(argv)}\n".encode())
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**child_env(self.on_gpu, self.spec.enable_sleep_mode),
                                               "VLLM_API_KEY": self.api_key},
                                          cwd=str(paths.home()))
            self.pid = self._proc.pid
            self.create_time = process_start.start_time_of(self.pid)  # stop() matches the pid by it
            self.started_at = time.time()
            registry.upsert(self.registry_entry())

    def start(self, timeout_s: float = 300.0, progress: ProgressCallback | None = None,
              cancel: threading.Event | None = None) -> None:
        """Launch and wait until verified ready; on any failure (or ``cancel`` set) the whole process
        group is ended."""
        self.launch()
        try:
            self.wait_ready(timeout_s, progress, cancel)
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout_s: float, progress: ProgressCallback | None = None,
                   cancel: threading.Event | None = None) -> None:
        t0 = time.monotonic()
        stage, last_reported, offset = "launching process", ("", ""), 0
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
            while True:
                elapsed = time.monotonic() - t0
                new_lines, offset = self._read_log_from(offset)
                for text in new_lines:
                    for pattern, name in _STAGES:
                        if pattern.search(text):
                            stage = name
                line = self.last_log_line()
                if progress and (stage, line) != last_reported:
                    last_reported = (stage, line)
                    report_progress(progress, StartProgress(stage, elapsed, line))
                if cancel is not None and cancel.is_set():
                    raise StartCancelled(f"the start of {self.spec.model_path} was cancelled after {elapsed:.0f} s "
                                         f"(stage: {stage}); that server was stopped", self.log_tail(),
                                         str(self.log_path))
                code = self.exit_code()
                if code is not None:
                    raise ServerStartError(
                        f"vLLM exited with code {code} while starting {self.spec.model_path}: "
                        f"{self.failure_reason()} (full log: {self.log_path})", self.log_tail(), str(self.log_path))
                if elapsed > timeout_s:
                    raise ServerStartError(
                        f"vLLM did not become ready within {timeout_s:.0f} s (last stage: {stage}); the server was "
                        f"stopped. Log: {self.log_path}", self.log_tail(), str(self.log_path))
                if self._verified_ready(http):
                    self.ready_at = time.time()
                    if progress:
                        report_progress(progress, StartProgress("ready", time.monotonic() - t0, line))
                    return
                if cancel is not None:
                    cancel.wait(0.5)  # a cancel wakes the loop at once
                else:
                    time.sleep(0.5)

    def _verified_ready(self, http: httpx.Client) -> bool:
        try:
            if http.get(f"{self.root_url}/health").status_code != 200:
                return False
            resp = http.get(f"{self.base_url}/models", headers=self._headers())
        except httpx.HTTPError:
            return False
        if resp.status_code != 200:
            return False
        return self.spec.served_name in [m.get("id") for m in self._note_context(resp.json().get("data", []))]

    def is_alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return process_start.is_running(self.pid, self.create_time)

    def exit_code(self) -> int | None:
        """The child's exit code once it has exited (-9 for kill -9), else None."""
        if self._proc is not None:
            return self._proc.poll()
        return None if self.is_alive() else -1

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """End the whole process group (SIGTERM, then SIGKILL after ``grace_s``); idempotent. A server not
        launched yet never will be."""
        with self._lifecycle:
            self._stopping = True
        if self.owned and self.pid:
            end_process_group(self.pid, self.create_time, grace_s)
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    log.error("vLLM child %s did not exit after SIGKILL", self.pid)
        if self.owned and self.pid:
            registry.remove(self.pid)
        from sage_ft.serving.chat import forget_client

        forget_client(self.base_url)
        if self._log_fh:
            self._log_fh.close()
            self._log_fh = None

    # ---- log -------------------------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - 16384))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _read_log_from(self, offset: int) -> tuple[list[str], int]:
        """Complete log lines written since byte ``offset`` (for start-up stage detection)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                chunk = fh.read(1 << 20)
        except OSError:
            return [], offset
        end = chunk.rfind(b"\n")
        if end < 0:
            return [], offset
        return chunk[: end + 1].decode("utf-8", errors="replace").splitlines(), offset + end + 1

    def last_log_line(self) -> str:
        lines = [ln.strip() for ln in self.log_tail(8).splitlines() if ln.strip()]
        for line in reversed(lines):  # prefer vLLM's own log records over Python warning noise
            if re.search(r"\b(INFO|WARNING|ERROR)\b|Error", line):
                return line[:300]
        return lines[-1][:300] if lines else ""

    def last_error_line(self) -> str:
        """The last ERROR record or exception line (a traceback's last line) of the log, without vLLM's
        "(APIServer pid=…) ERROR <date> [file.py:N]" prefix; "" when the log names no error (a server
        killed by a signal usually leaves none: its last INFO line says nothing about why it stopped)."""
        for line in reversed(self.log_tail(80).splitlines()):
            line = line.strip()
            if _ERROR_RECORD.match(line) or _EXCEPTION_LINE.match(line):
                return _VLLM_PREFIX.sub("", line)[:300]
        return ""

    def failure_reason(self) -> str:
        """The most telling error line of the log (the last one that names an error)."""
        for line in reversed(self.log_tail(80).splitlines()):
            if _ERROR_LINE.search(line) and not _NOISE_LINE.search(line):
                return line.strip()[:500]
        return self.last_log_line() or "no output"

    # ---- API -------------------------------------------------------------------------------
    def health(self) -> bool:
        try:
            return httpx.get(f"{self.root_url}/health", timeout=HTTP_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            return False

    def served_models(self) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.base_url}/models", headers=self._headers(), timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        return self._note_context(list(resp.json().get("data", [])))

    def _note_context(self, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Record the context length vLLM lists for the served model (with "auto" only it knows it)."""
        for entry in models:
            if entry.get("id") == self.spec.served_name and isinstance(entry.get("max_model_len"), int):
                self.context_len = entry["max_model_len"]
        return models

    def count_chat_tokens(self, model: str, messages: list[dict[str, str]]) -> tuple[int, int]:
        """(prompt tokens, context length) of a chat as the server's tokenizer and template see it."""
        resp = httpx.post(f"{self.root_url}/tokenize", headers=self._headers(), timeout=HTTP_TIMEOUT_S,
                          json={"model": model, "messages": messages, "add_generation_prompt": True})
        resp.raise_for_status()
        data = resp.json()
        return int(data["count"]), int(data["max_model_len"])

    def load_adapter(self, name: str, path: str | Path) -> None:
        resp = httpx.post(f"{self.base_url}/load_lora_adapter", headers=self._headers(),
                          json={"lora_name": name, "lora_path": str(path)}, timeout=ADAPTER_LOAD_TIMEOUT_S)
        if resp.status_code != 200:
            raise AdapterLoadError(_error_message(resp), resp.status_code)

    def unload_adapter(self, name: str) -> None:
        resp = httpx.post(f"{self.base_url}/unload_lora_adapter", headers=self._headers(),
                          json={"lora_name": name}, timeout=HTTP_TIMEOUT_S)
        if resp.status_code not in (200, 404):
            raise AdapterLoadError(_error_message(resp), resp.status_code)

    def metrics(self) -> ServerMetrics:
        resp = httpx.get(f"{self.root_url}/metrics", headers=self._headers(), timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        return server_metrics(resp.text)

    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory (CUDA only, needs ``enable_sleep_mode``)."""
        httpx.post(f"{self.root_url}/sleep", params={"level": level}, headers=self._headers(),
                   timeout=120).raise_for_status()

    def wake_up(self) -> None:
        httpx.post(f"{self.root_url}/wake_up", headers=self._headers(), timeout=120).raise_for_status()

    # ---- registry --------------------------------------------------------------------------
    def registry_entry(self) -> dict[str, Any]:
        return {"pid": self.pid, "create_time": self.create_time, "port": self.spec.port,
                "api_key": self.api_key, "log_path": str(self.log_path), "started_at": self.started_at,
                "spec": asdict(self.spec), **self.meta, **registry.owner_identity()}

    @classmethod
    def from_registry(cls, entry: dict[str, Any]) -> VLLMServer:
        """A handle on a server some sage-ft process started earlier (no Popen: watched by pid)."""
        spec_fields = {k: v for k, v in entry.get("spec", {}).items() if k in ServerSpec.__dataclass_fields__}
        server = cls(ServerSpec(**spec_fields), api_key=entry["api_key"], log_path=Path(entry["log_path"]),
                     meta={k: entry[k] for k in ("kind", "base_path", "display_name", "merged_from", "adapters")
                           if k in entry})
        server.pid, server.create_time = entry["pid"], entry["create_time"]
        server.started_at = entry.get("started_at")
        server.ready_at = time.time()
        return server


def end_process_group(pid: int, create_time: float | None, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the child's process group (and any descendant that left it), SIGKILL what remains.

    The leader is checked against its recorded create time first, so a reused pid is never
    signalled. When the leader already died (kill -9, crash), the rest of its group (engine core,
    workers) is found by process-group id — the kernel never hands out a pid that is still in use as
    a group id, so those are ours (unless the pid itself was reused, which is checked).
    """
    procs: list[psutil.Process] = []
    if process_start.is_running(pid, create_time):
        try:
            procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            procs = []
        _signal_group(pid, signal.SIGTERM)
    elif process_start.start_time_of(pid) is not None and not process_start.started_at(pid, create_time):
        return  # the pid now belongs to another process: neither it nor its group is ours
    procs += [p for p in group_members(pid) if p not in procs]
    for proc in procs:
        _signal_proc(proc, signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    if alive:
        log.warning("vLLM group %s ignored SIGTERM for %.0f s; sending SIGKILL", pid, grace_s)
        for proc in alive:
            _signal_proc(proc, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=grace_s)


def group_members(pgid: int) -> list[psutil.Process]:
    """Live processes whose process group is ``pgid`` (not zombies)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_proc(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _error_message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
        if isinstance(body, dict):
            err = body.get("error", body)
            return str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, json.JSONDecodeError):
        pass
    return resp.text.strip()[:500] or f"HTTP {resp.status_code}"


def report_progress(fn: ProgressCallback | None, item: StartProgress) -> None:
    """Tell ``fn`` (if any) about ``item``; a UI callback that fails is logged, never breaks a start."""
    if fn is None:
        return
    try:
        fn(item)
    except Exception:
        log.exception("start progress callback failed")
