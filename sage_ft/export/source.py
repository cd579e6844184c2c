"""What an export starts from: a run directory, one of its ``checkpoint-N`` dirs, or a bare adapter.

Every export entry point (merge, verify, CLI, web UI) resolves its input here once, so "which adapter,
which base model, which tokenizer, what is it called" has one answer and one set of error messages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

META_FILE = "finetune_meta.json"
ADAPTER_CONFIG = "adapter_config.json"
EXPORT_RECORD = "sage_ft_export.json"


class ExportError(RuntimeError):
    """An export was refused or failed; the message says what to do."""


class ExportCancelled(ExportError):
    """The caller's cancel event was set; nothing was left behind."""


@dataclass(frozen=True)
class ExportSource:
    """A resolved export input. ``name`` is the stem used for default output names."""

    adapter_dir: Path
    base_model: Path
    tokenizer_dir: Path
    name: str
    run_dir: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def checkpoint(self) -> str | None:
        return self.adapter_dir.name if self.adapter_dir.name.startswith("checkpoint-") else None


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or an ExportError naming the file and the line of the defect."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except OSError as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _resolve_base(name: str, where: Path) -> Path:
    """The base model's directory; uses the models area's resolver when it is available."""
    try:
        from sage_ft.models.resolve import resolve_model
    except ImportError:
        resolve_model = None
    if resolve_model is not None:
        try:
            return Path(resolve_model(name))
        except Exception as exc:  # ModelError and friends: re-word with where the name came from
            raise ExportError(f"base model {name!r} (named in {where}) cannot be found: {exc}") from exc
    path = Path(name).expanduser()
    if not (path / "config.json").exists():
        raise ExportError(f"base model {name!r} (named in {where}) is not a model directory with config.json; "
                          "restore it or point base_model at a local copy")
    return path.resolve()


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists()


def resolve_source(path: str | Path) -> ExportSource:
    """Resolve a run dir (with ``lora/``), a ``checkpoint-N`` dir or an adapter dir."""
    given = Path(path).expanduser()
    if not given.exists():
        raise ExportError(f"{given} does not exist: pass a fine-tune run directory, one of its "
                          "checkpoint-N directories, or an adapter directory")
    given = given.resolve()
    if (given / ADAPTER_CONFIG).exists():
        adapter_dir = given
        run_dir = given.parent if (given.parent / META_FILE).exists() else None
    elif (given / "lora" / ADAPTER_CONFIG).exists():
        adapter_dir, run_dir = given / "lora", given
    else:
        hint = ""
        checkpoints = sorted(given.glob("checkpoint-*/" + ADAPTER_CONFIG))
        if checkpoints:
            hint = f"; its checkpoints can be exported instead, e.g. {checkpoints[-1].parent}"
        elif (given / META_FILE).exists():
            status = read_json(given / META_FILE).get("status", "unknown")
            hint = f"; the run's status is {status!r} and it has not saved an adapter yet"
        elif (given / EXPORT_RECORD).exists() or (given / "config.json").exists():
            raise ExportError(f"{given} is a whole model already (a merged export or a base model), not a LoRA "
                              "fine-tune: export merges a run's adapter into its base; give the run (its folder, "
                              "name or task id) instead, or chat with this model as it is")
        raise ExportError(f"{given} holds no LoRA adapter (no lora/{ADAPTER_CONFIG} and no {ADAPTER_CONFIG}){hint}")

    meta = read_json(run_dir / META_FILE) if run_dir else {}
    adapter_config = read_json(adapter_dir / ADAPTER_CONFIG)
    # The trainer records the resolved directory (base_model_path) next to what the user typed
    # (base_model, e.g. "demo" or a hub id); the directory wins while it still exists.
    recorded_path = meta.get("base_model_path")
    if recorded_path and (Path(recorded_path) / "config.json").exists():
        base_name, where = recorded_path, run_dir / META_FILE
    elif meta.get("base_model"):
        base_name, where = meta["base_model"], run_dir / META_FILE
    else:
        base_name, where = adapter_config.get("base_model_name_or_path"), adapter_dir / ADAPTER_CONFIG
    if not base_name:
        raise ExportError(f"no base model recorded: neither {run_dir / META_FILE if run_dir else 'a run meta file'} "
                          f"'base_model' nor {adapter_dir / ADAPTER_CONFIG} 'base_model_name_or_path' is set")
    base_model = _resolve_base(str(base_name), where)

    candidates = [adapter_dir] + ([run_dir / "lora"] if run_dir else []) + [base_model]
    tokenizer_dir = next((c for c in candidates if _has_tokenizer(c)), base_model)

    if run_dir is None:
        name = adapter_dir.name
    elif adapter_dir.name.startswith("checkpoint-"):
        name = f"{run_dir.name}-{adapter_dir.name}"
    else:
        name = run_dir.name
    return ExportSource(adapter_dir=adapter_dir, base_model=base_model, tokenizer_dir=tokenizer_dir,
                        name=name, run_dir=run_dir, meta=meta)


def run_dir_for(task_id_or_path: str | int | Path) -> Path:
    """A task id (``7`` or ``#7``, looked up in the task store), a name of the data home or a path -> the
    directory to export from."""
    # the one rule for names where a model is expected, as for switch and serve (exports/, runs/, tasks ...)
    from sage_ft.serving.targets import TargetError, named_model

    try:
        named = named_model(str(task_id_or_path))
    except TargetError as exc:
        raise ExportError(f"{exc}; or pass a run directory") from exc
    return Path(named) if named else Path(str(task_id_or_path)).expanduser()
