"""What the UI holds on to: one TaskManager (with its worker thread), the optional chat-server
manager, the path guard, and thin calls into core modules that are imported lazily.

Handlers ask these for data and render it; no training, data or serving logic lives here. Core
modules still being written are imported inside the calls, so the app starts (and says what is
missing) even before they exist.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sage_ft import paths
from sage_ft.tasks import Task, TaskError, TaskManager, TaskStatus, parse_task_id
from sage_ft.webui.uploads import MAX_UPLOAD_BYTES, PathGuard

log = logging.getLogger(__name__)
QUEUE_REFRESH_S = 10  # how often a queued task's "starts in ~" is redrawn
DEVICE_CACHE_S = 1.5  # below the page tick (2 s), so each tick of one page still sees a fresh sample
_DEVICE_CACHE: dict[str, tuple[float, dict[str, Any]]] = {}
_DEVICE_LOCK = threading.Lock()


@dataclass
class ModelChoice:
    label: str
    value: str
    kind: str = "base"


def task_id_of(value: Any) -> int:
    """The task a picker value names: 7, "7", "#7" or "#7 name" (what the task list shows). Text that
    names none raises ``TaskError`` saying so; the picker accepts typing, and int("abc") broke the page's
    tick until another task was picked."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    parsed = parse_task_id(str(value).strip().split(" ", 1)[0])  # "#7 name": the id, then the name
    if parsed is None:
        raise TaskError(f"no task {str(value)[:60]!r}; pick one from the task list")
    return parsed


@dataclass
class AppServices:
    tasks: TaskManager
    guard: PathGuard = field(default_factory=PathGuard)
    server: Any | None = None  # sage_ft.serving ServerManager, None with --no-llm
    default_lang: str | None = None  # --lang; None: each page opens in its browser's language (i18n.page_lang)
    # Saved configs live in the data home; the shipped examples (configs/ of the project) are only read:
    # saving "demo_cpu" wrote over the commented example in the source tree (or in site-packages).
    configs_dir: Path = field(default_factory=lambda: paths.home() / "configs")
    examples_dir: Path = field(default_factory=lambda: paths.project_root() / "configs")
    downloads_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sage_ft_dl_")))
    llm_disabled: bool = False
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    form_starts: dict[str, tuple[int, float]] = field(default_factory=dict)  # config YAML -> (task id, when)

    # ------------------------------------------------------------------ tasks
    def queue_stamp(self, task: Task) -> str:
        """What moves a queued task's place and expected start — the other tasks and the clock — for
        the fingerprints that decide when a progress bar is redrawn ('' for a task not queued)."""
        if task.status is not TaskStatus.QUEUED:
            return ""
        return f"{self.tasks.version()}@{int(time.time() // QUEUE_REFRESH_S)}"

    # ------------------------------------------------------------------ models
    def model_choices(self) -> list[ModelChoice]:
        """Base models from the registry (the demo first). The value is what ``resolve_model`` takes."""
        from sage_ft.models.registry import list_models

        out = []
        for entry in list_models(kind="base"):
            value = entry.name if entry.source == "demo" else entry.path
            label = entry.label + (f" — {entry.note}" if entry.note and not entry.available else "")
            out.append(ModelChoice(label, value, entry.kind))
        return out

    def add_local_model(self, path: str) -> str:
        """Register a local model directory (checked by the registry); returns the value to select."""
        self.guard.check(path, "model path")
        from sage_ft.models.registry import add_local_model

        return add_local_model(Path(path).expanduser()).path

    # ------------------------------------------------------------------ datasets
    def dataset_choices(self) -> list[tuple[str, str]]:
        """Dataset files under the data home's datasets/ (uploads and generated ones)."""
        root = paths.datasets_dir()
        files = sorted((p for p in root.rglob("*") if p.suffix.lower() in (".json", ".jsonl") and p.is_file()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        return [(str(p.relative_to(root)), str(p)) for p in files[:200]]

    # ------------------------------------------------------------------ configs
    def config_choices(self) -> list[tuple[str, str]]:
        """Saved configs, uploaded ones, then the shipped examples (not ``models.yaml``, the model list)."""
        out = []
        for root, tag in ((self.configs_dir, ""), (paths.home() / "configs" / "uploads", ""),
                          (self.examples_dir, " (example)")):
            if root.is_dir():
                found = root.rglob("*.y*ml") if root.name == "uploads" else root.glob("*.y*ml")  # one folder each
                out += [(p.name + tag, str(p)) for p in sorted(found) if p.name != "models.yaml"]
        return out

    def config_path_for(self, name: str) -> Path:
        """``<data home>/configs/<name>.yaml`` for a user-typed name (letters, digits, ``-_.`` only)."""
        stem = name.strip().removesuffix(".yaml").removesuffix(".yml")
        if not stem or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,80}", stem) or ".." in stem:
            raise ValueError(f"config name {name[:80]!r}: use letters, digits, '-', '_' or '.' (no folders), "
                             "e.g. my-chat-run")
        return self.configs_dir / f"{stem}.yaml"

    # ------------------------------------------------------------------ files for the browser
    def stage_download(self, src: str | Path, name: str | None = None) -> str:
        """Copy a file into this app's download folder (a temp dir), so ``allowed_paths`` stays empty."""
        src = Path(src)
        target = self.downloads_dir / (name or src.name)
        shutil.copyfile(src, target)
        return str(target)

    # ------------------------------------------------------------------ status for the top bar
    def device_summary(self) -> dict[str, Any]:
        """``gpu.device_info()`` plus the CPU load (NVML and psutil counters), sampled at most once per
        ``DEVICE_CACHE_S`` for all open pages together."""
        now = time.monotonic()
        with _DEVICE_LOCK:
            cached = _DEVICE_CACHE.get("info")
            if cached is not None and now - cached[0] < DEVICE_CACHE_S:
                return dict(cached[1])
        import psutil

        from sage_ft.gpu import device_info

        info = device_info()
        info["cpu_percent"] = psutil.cpu_percent(interval=None)
        with _DEVICE_LOCK:
            _DEVICE_CACHE["info"] = (now, info)
        return dict(info)

    def serving_summary(self) -> dict[str, Any]:
        """``{"model", "kind", "state", "detail"}`` of the chat server (its manager's recorded state)."""
        if self.server is None:
            return {"model": None, "kind": None, "state": "disabled" if self.llm_disabled else "not_started",
                    "detail": ""}
        try:
            status = self.server.status
            status = status() if callable(status) else status
        except Exception as exc:  # a status read must never break the page
            log.exception("server status failed")
            return {"model": None, "kind": None, "state": "error", "detail": str(exc)}
        return {"model": status.get("model_label") or status.get("model"), "kind": status.get("model_type"),
                "state": status.get("state") or "unknown",
                "detail": status.get("last_error") or status.get("message") or status.get("backend_reason") or ""}

    def shutdown(self) -> None:
        shutil.rmtree(self.downloads_dir, ignore_errors=True)


@lru_cache(maxsize=4)
def tokenizer_for(model: str, template: str):
    """The tokenizer (with chat template) the trainer would use, cached per model/template."""
    from sage_ft.models.resolve import resolve_model
    from sage_ft.training.engine import load_tokenizer

    return load_tokenizer(resolve_model(model), template)
