"""``finetune_meta.json``: what a run was, how it ended, and with which versions — written atomically.

Every reader (task list, serving, export, the UI) trusts this one file, so it is always replaced in
one rename (temp file + fsync + rename): a crash mid-write leaves the previous version, never half
of one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sage_ft.atomic import atomic_writer

META_NAME = "finetune_meta.json"
STATUSES = ("running", "completed", "failed", "cancelled", "interrupted")


def write_json_atomic(path: Path, data: Any) -> Path:
    with atomic_writer(path) as fh:
        json.dump(data, fh, indent=2, default=str, ensure_ascii=False)
    return path


def read_meta(run_dir: str | Path) -> dict[str, Any]:
    """The run's meta, or ``{}`` when the run has none yet (or it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_meta(run_dir: str | Path, meta: dict[str, Any]) -> Path:
    return write_json_atomic(Path(run_dir) / META_NAME, meta)


def mark_interrupted(run_dir: str | Path, reason: str, from_statuses: tuple[str, ...] = ("running",)) -> bool:
    """Record that the run's process died (or was stopped by an app shutdown) mid-run.

    The task manager calls this when it marks a task interrupted, so the meta never keeps saying
    "running" for a dead run and every reader (model registry, UI, export) agrees with the task
    list. Only a meta in ``from_statuses`` changes; returns whether it did. Atomic like every
    meta write.
    """
    from datetime import datetime

    meta = read_meta(run_dir)
    if not meta or meta.get("status") not in from_statuses:
        return False
    meta.update(status="interrupted", error=reason,
                finished_at=datetime.now().astimezone().isoformat(timespec="seconds"))
    write_meta(run_dir, meta)
    return True


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the result (recorded for reproducibility)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "sage-ft"):
        try:
            out[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            out[name.replace("-", "_")] = "not installed"
    return out
