"""What the UI holds on to: one TaskManager (with its worker thread), the optional chat-server
manager, the path guard, and thin calls into core modules that are imported lazily.

Handlers ask these for data and render it; no training, data or serving logic lives here. Core
modules still being written are imported inside the calls, so the app starts (and says what is
missing) even before they exist.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from sage_ft import paths
from sage_ft.data.load import SUFFIXES
from sage_ft.tasks import Task, TaskError, TaskManager, TaskStatus, parse_task_id
from sage_ft.webui.uploads import MAX_UPLOAD_BYTES, PathGuard, upload_dir

log = logging.getLogger(__name__)
EXAMPLE_TAG = " (example)"
UPLOAD_TAG = " (uploaded)"
CONFIG_NAME_MAX = 80  # characters; 80 CJK characters are 240 bytes, under the file systems' 255
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
        """Dataset files under the data home's datasets/ (uploads and generated ones), newest first,
        then the Hub datasets in the local Hugging Face cache (by id)."""
        from sage_ft.data.sources import cached_hub_datasets

        root = paths.datasets_dir()
        files = sorted((p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()),
                       key=lambda p: p.stat().st_mtime, reverse=True)
        hub = [(f"🤗 {repo_id}", repo_id) for repo_id in cached_hub_datasets()]
        return [(str(p.relative_to(root)), str(p)) for p in files[:200]] + hub

    # ------------------------------------------------------------------ configs
    def config_choices(self) -> list[tuple[str, str]]:
        """Saved configs, uploaded ones (tagged, as the examples are), then the shipped examples (not
        ``models.yaml``, the model list). An upload is listed once however often the same file was
        uploaded, and only while it loads: the list filled with every failed or repeated upload."""
        out = []
        if self.configs_dir.is_dir():
            out += [(p.name, str(p)) for p in sorted(self.configs_dir.glob("*.y*ml")) if p.name != "models.yaml"]
        out += self.uploaded_configs()
        if self.examples_dir.is_dir():
            out += [(p.name + EXAMPLE_TAG, str(p)) for p in sorted(self.examples_dir.glob("*.y*ml"))
                    if p.name != "models.yaml"]
        return out

    def uploaded_configs(self) -> list[tuple[str, str]]:
        """``(label, path)`` of each distinct upload that loads as a config, oldest first; two uploads
        of one name that differ are told apart by their upload time."""
        from sage_ft.config import ConfigError, TrainConfig

        root = upload_dir("config")
        seen: set[tuple[str, bytes]] = set()
        labels: set[str] = set()
        out = []
        for path in sorted(root.glob("*/*.y*ml")):  # one folder per upload, named by its time
            key = (path.name, _digest(path))
            if key in seen:
                continue
            try:
                TrainConfig.from_yaml(path)
            except (ConfigError, OSError):
                continue
            seen.add(key)
            label = path.name + UPLOAD_TAG
            if label in labels:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
                label = f"{path.name} (uploaded {when})"
            labels.add(label)
            out.append((label, str(path)))
        return out

    def earlier_upload(self, stored: Path) -> Path | None:
        """An earlier upload with the same name and the same bytes as ``stored`` (a repeated upload)."""
        digest = _digest(stored)
        for path in sorted(stored.parent.parent.glob(f"*/{stored.name}")):
            if path != stored and _digest(path) == digest:
                return path
        return None

    @staticmethod
    def discard_upload(stored: Path) -> None:
        """Remove an uploaded config (its own folder) that failed to load or repeats an earlier one."""
        if stored.parent.parent == upload_dir("config"):
            shutil.rmtree(stored.parent, ignore_errors=True)

    def config_path_for(self, name: str) -> Path:
        """``<data home>/configs/<name>.yaml`` for a user-typed name: letters of any script (配置 too),
        digits, spaces and punctuation; refused are only what would leave the folder or hide the file
        (path separators, a leading '.'), control characters, and names over ``CONFIG_NAME_MAX``."""
        stem = name.strip().removesuffix(".yaml").removesuffix(".yml").strip()
        bad = (not stem or len(stem) > CONFIG_NAME_MAX or stem.startswith(".") or any(c in "/\\" for c in stem)
               or any(unicodedata.category(c).startswith("C") for c in stem))
        if bad:
            shown = name[:80] + ("…" if len(name) > 80 else "")
            raise ValueError(f"config name {shown!r}: use letters, digits, spaces, '-', '_' or '.' (any language; "
                             f"no folders, no leading '.', at most {CONFIG_NAME_MAX} characters), e.g. my-chat-run")
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


def _digest(path: Path) -> bytes:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return b""
