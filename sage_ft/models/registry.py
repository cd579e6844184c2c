"""Every model a user can train from or chat with, in one list: ``list_models()``.

Sources, in display order: the built-in demo model, the configured list (``configs/models.yaml``
shipped with sage-ft plus ``<home>/models.yaml`` with the user's additions), local directories added
with ``add_local_model``, the Hugging Face cache, finished fine-tunes under ``paths.runs_dir()``
(LoRA adapters and merged models) and merged exports under ``paths.exports_dir()``.

The UI polls this every few seconds, so listing imports no torch, builds nothing (the demo model is
shown as "not built yet" until first use), and caches directory sizes and run metadata by mtime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from sage_ft import paths
from sage_ft.models.resolve import ModelError, missing_parts

KINDS = ("base", "lora", "merged")
FINISHED_STATUSES = ("completed", "cancelled")
USER_MODELS_FILE = "models.yaml"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_KIND_LABEL = {"lora": "LoRA", "merged": "merged"}


@dataclass
class ModelEntry:
    """One selectable model. ``available`` is False for a configured hub model not downloaded yet
    and for the demo model before its first build; ``note`` says what happens on first use."""

    name: str
    path: str
    kind: str  # base | lora | merged
    tags: list[str]
    source: str  # demo | config | local | hf_cache | run | export
    base_model: str | None = None
    size_bytes: int | None = None
    created: str | None = None  # ISO time
    final_loss: float | None = None
    dataset: str | None = None
    task_id: str | None = None  # the task id from the meta, else the run directory's name
    checkpoints: list[tuple[int, str]] = field(default_factory=list)
    available: bool = True
    note: str = ""
    description: str = ""

    @property
    def label(self) -> str:
        """Display name with its tags, e.g. ``my-run [finetuned · LoRA]``."""
        shown = [_KIND_LABEL.get(t, t) for t in self.tags]
        return f"{self.name} [{' · '.join(shown)}]"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["label"] = self.label
        out["checkpoints"] = [list(c) for c in self.checkpoints]
        return out


# ---------------------------------------------------------------------------------------- caches
_size_cache: dict[str, tuple[int, int]] = {}  # path -> (mtime_ns stamp, size)
_meta_cache: dict[str, tuple[tuple[int, int], dict[str, Any] | None]] = {}


def _stamp(path: Path) -> int:
    """Changes when the directory or its direct children change (enough for finished model dirs)."""
    try:
        stamp = path.stat().st_mtime_ns
        with os.scandir(path) as it:
            for entry in it:
                stamp = max(stamp, entry.stat(follow_symlinks=True).st_mtime_ns)
        return stamp
    except OSError:
        return -1


def dir_size(path: str | Path) -> int:
    """Total bytes of the files under ``path`` (symlinks followed, as in the HF cache); cached."""
    path = Path(path)
    stamp = _stamp(path)
    cached = _size_cache.get(str(path))
    if cached and cached[0] == stamp:
        return cached[1]
    total = 0
    for root, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    _size_cache[str(path)] = (stamp, total)
    return total


def read_meta(run_dir: str | Path) -> dict[str, Any] | None:
    """``finetune_meta.json`` of a run (cached by mtime); None when missing or unreadable."""
    path = Path(run_dir) / "finetune_meta.json"
    try:
        st = path.stat()
    except OSError:
        return None
    key = (st.st_mtime_ns, st.st_size)
    cached = _meta_cache.get(str(path))
    if cached and cached[0] == key:
        return cached[1]
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta = meta if isinstance(meta, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    _meta_cache[str(path)] = (key, meta)
    return meta


def _iso(ts: float | str | None) -> str | None:
    if ts is None:
        return None
    if isinstance(ts, (int, float)):
        return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")
    return str(ts)


def _mtime_iso(path: Path) -> str | None:
    try:
        return _iso(path.stat().st_mtime)
    except OSError:
        return None


# ---------------------------------------------------------------------------------------- validation
def model_problems(path: str | Path) -> list[str]:
    """What keeps ``path`` from being a usable base/merged model directory (empty = usable)."""
    path = Path(path)
    if not path.exists():
        return ["the directory does not exist"]
    if not path.is_dir():
        return ["it is a file, not a directory"]
    problems = [f"missing {part}" for part in missing_parts(path)]
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            absent = sorted(s for s in shards if not (path / s).exists())
            if absent:
                problems.append(f"missing weight shards listed in {index.name}: {', '.join(absent[:3])}"
                                + (f" and {len(absent) - 3} more" if len(absent) > 3 else ""))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            problems.append(f"{index.name} is unreadable (corrupted)")
    cfg = path / "config.json"
    if cfg.exists():
        try:
            if not isinstance(json.loads(cfg.read_text(encoding="utf-8")), dict):
                raise ValueError
        except (OSError, UnicodeDecodeError, ValueError):
            problems.append("config.json is not a valid JSON object")
    return problems


def final_loss(meta: dict[str, Any]) -> float | None:
    """The run's last training loss from its meta (``final_metrics`` or ``metrics``; several spellings)."""
    for key in ("final_metrics", "metrics"):
        metrics = meta.get(key)
        if isinstance(metrics, dict):
            for name in ("final_loss", "loss", "train_loss"):
                if isinstance(metrics.get(name), (int, float)) and not isinstance(metrics.get(name), bool):
                    return float(metrics[name])
    return None


def _adapter_ok(lora_dir: Path) -> bool:
    return (lora_dir / "adapter_config.json").is_file() and (
        (lora_dir / "adapter_model.safetensors").is_file() or (lora_dir / "adapter_model.bin").is_file())


# ---------------------------------------------------------------------------------------- user file
def user_models_path() -> Path:
    return paths.home() / USER_MODELS_FILE


def shipped_models_path() -> Path:
    return paths.project_root() / "configs" / "models.yaml"


def _read_models_yaml(path: Path) -> list[dict[str, Any]]:
    """The ``models:`` list of a YAML file; a broken file is logged and skipped, never fatal."""
    if not path.exists():
        return []
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        import logging

        logging.getLogger(__name__).warning("%s: unreadable model list (%s); ignored", path, exc)
        return []
    items = data.get("models", []) if isinstance(data, dict) else []
    return [i for i in items if isinstance(i, dict) and (i.get("path") or i.get("name"))]


def add_local_model(path: str | Path, name: str | None = None) -> ModelEntry:
    """Validate a local model directory and remember it in ``<home>/models.yaml``.

    Raises ``ModelError`` naming the directory and what is missing (config.json, weights, shards,
    tokenizer). Adding the same directory twice updates its name.
    """
    path = Path(path).expanduser().resolve()
    problems = model_problems(path)
    if problems:
        hint = (" (this is a LoRA adapter folder; add its base model, fine-tunes are listed automatically)"
                if (path / "adapter_config.json").exists() else "")
        raise ModelError(f"model directory {path} cannot be used: {'; '.join(problems)}{hint}")
    file = user_models_path()
    items = [i for i in _read_models_yaml(file) if str(i.get("path")) != str(path)]
    items.append({"name": name or path.name, "path": str(path)})
    tmp = file.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump({"models": items}, sort_keys=False, allow_unicode=True), encoding="utf-8")
    tmp.replace(file)
    return _local_entry(name or path.name, path, "local")


# ---------------------------------------------------------------------------------------- sources
def _demo_entry() -> ModelEntry:
    from sage_ft.models.demo import DEMO_NAME, is_demo_model

    path = paths.demo_model_dir()
    built = is_demo_model(path)
    return ModelEntry(name=DEMO_NAME, path=str(path), kind="base", tags=["base", "demo"], source="demo",
                      size_bytes=dir_size(path) if built else None, created=_mtime_iso(path) if built else None,
                      available=True, note="" if built else "not built yet, built on first use",
                      description="built-in tiny Llama (random weights) for trying the studio and for tests")


def _local_entry(name: str, path: Path, source: str, description: str = "") -> ModelEntry:
    problems = model_problems(path)
    return ModelEntry(name=name, path=str(path), kind="base", tags=["base"], source=source,
                      size_bytes=dir_size(path) if not problems else None, created=_mtime_iso(path),
                      available=not problems, description=description,
                      note="; ".join(problems))


def _hf_cache_snapshots() -> dict[str, tuple[Path, int, float]]:
    """repo id -> (newest snapshot dir, repo size on disk, last modified) from the HF cache."""
    try:
        from huggingface_hub import scan_cache_dir

        info = scan_cache_dir(paths.hf_hub_cache())
    except Exception:  # no cache dir yet, unreadable cache, old huggingface_hub: nothing cached
        return {}
    out: dict[str, tuple[Path, int, float]] = {}
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        if (Path(newest.snapshot_path) / "config.json").exists():
            out[repo.repo_id] = (Path(newest.snapshot_path), int(repo.size_on_disk), float(repo.last_modified))
    return out


def _configured_entries(cache: dict[str, tuple[Path, int, float]]) -> list[ModelEntry]:
    entries = []
    for source, file in (("config", shipped_models_path()), ("local", user_models_path())):
        for item in _read_models_yaml(file):
            ref = str(item.get("path") or item.get("name"))
            name = str(item.get("name") or ref)
            description = str(item.get("description") or "")
            local = Path(ref).expanduser()
            if local.is_absolute() or ref.startswith((".", "~")) or local.exists():
                entries.append(_local_entry(name, local, source, description))
            elif ref in cache:
                snap, size, modified = cache[ref]
                entries.append(ModelEntry(name=name, path=ref, kind="base", tags=["base"], source=source,
                                          size_bytes=size, created=_iso(modified), description=description,
                                          note=f"in the Hugging Face cache: {snap}"))
            else:
                entries.append(ModelEntry(name=name, path=ref, kind="base", tags=["base"], source=source,
                                          available=False, description=description,
                                          note="not downloaded; fetched from the Hugging Face hub on first use"))
    return entries


def _run_entries(include_checkpoints: bool) -> list[ModelEntry]:
    entries = []
    root = paths.runs_dir()
    try:
        run_dirs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.name)
    except OSError:
        return []
    for run in run_dirs:
        meta = read_meta(run)
        if not meta or meta.get("status") not in FINISHED_STATUSES:
            continue
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        loss = final_loss(meta)
        base = meta.get("base_model_name") or meta.get("base_model") or config.get("model_name_or_path")
        dataset = meta.get("dataset") or config.get("dataset")
        common = dict(base_model=str(base) if base else None, final_loss=loss,
                      dataset=", ".join(map(str, dataset)) if isinstance(dataset, list) else dataset,
                      task_id=str(meta.get("task_id") or run.name),
                      created=_iso(meta.get("finished_at") or meta.get("created_at")) or _mtime_iso(run))
        name = str(meta.get("run_name") or config.get("run_name") or run.name)
        if name != run.name:
            name = f"{name} ({run.name})"  # names must stay unique: the directory name disambiguates
        lora = run / "lora"
        if _adapter_ok(lora):
            ckpts = []
            if include_checkpoints:
                ckpts = sorted((int(m.group(1)), str(c)) for c in run.iterdir()
                               if (m := _CHECKPOINT_RE.match(c.name)) and _adapter_ok(c))
            entries.append(ModelEntry(name=name, path=str(lora), kind="lora", tags=["finetuned", "lora"],
                                      source="run", size_bytes=dir_size(lora), checkpoints=ckpts, **common))
        merged = run / "merged_model"
        if merged.is_dir() and not model_problems(merged):
            entries.append(ModelEntry(name=f"{name}-merged", path=str(merged), kind="merged",
                                      tags=["finetuned", "merged"], source="run", size_bytes=dir_size(merged),
                                      **common))
    return entries


def _export_entries() -> list[ModelEntry]:
    entries = []
    try:
        dirs = sorted(d for d in paths.exports_dir().iterdir() if d.is_dir())
    except OSError:
        return []
    for d in dirs:
        if model_problems(d):
            continue  # GGUF-only exports, half-written merges: not loadable as HF models
        meta = {}
        for marker in ("sage_ft_export.json", "finetune_meta.json"):
            try:
                loaded = json.loads((d / marker).read_text(encoding="utf-8"))
                meta = loaded if isinstance(loaded, dict) else {}
                break
            except (OSError, UnicodeDecodeError, ValueError):
                continue
        loss = final_loss(meta)
        entries.append(ModelEntry(name=d.name, path=str(d), kind="merged", tags=["finetuned", "merged"],
                                  source="export", size_bytes=dir_size(d), final_loss=loss,
                                  base_model=meta.get("base_model_name") or meta.get("base_model"),
                                  dataset=meta.get("dataset"), task_id=meta.get("task_id") or meta.get("run"),
                                  created=_iso(meta.get("created_at")) or _mtime_iso(d)))
    return entries


# ---------------------------------------------------------------------------------------- public API
def list_models(include_checkpoints: bool = False, kind: str | None = None) -> list[ModelEntry]:
    """Base models first (demo, configured, local, HF cache), then fine-tunes newest first.

    The same directory is listed once (a configured hub id that is cached is shown as configured).
    """
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind {kind!r}: choose one of {', '.join(KINDS)}")
    cache = _hf_cache_snapshots()
    bases = [_demo_entry(), *_configured_entries(cache)]
    known = {e.path for e in bases}
    for repo_id, (snap, size, modified) in sorted(cache.items()):
        if repo_id not in known:
            bases.append(ModelEntry(name=repo_id, path=repo_id, kind="base", tags=["base"], source="hf_cache",
                                    size_bytes=size, created=_iso(modified), note=f"cached at {snap}"))
    seen: set[str] = set()
    unique = []
    for entry in bases:
        if entry.path not in seen:
            seen.add(entry.path)
            unique.append(entry)
    tuned = _run_entries(include_checkpoints) + _export_entries()
    tuned.sort(key=lambda e: e.created or "", reverse=True)
    everything = unique + tuned
    return [e for e in everything if kind is None or e.kind == kind]


def find_model(name_or_path: str, include_checkpoints: bool = False) -> ModelEntry | None:
    """The entry whose name, label, path or task id is ``name_or_path``; None when there is none."""
    wanted = str(name_or_path).strip()
    entries = list_models(include_checkpoints=include_checkpoints)
    resolved = str(Path(wanted).expanduser().resolve()) if wanted else ""
    for match in (lambda e: e.name == wanted or e.label == wanted,
                  lambda e: e.path == wanted or e.path == resolved,
                  lambda e: e.task_id == wanted):
        found = [e for e in entries if match(e)]
        if found:
            return found[0]
    return None


def latest_finetuned(kind: str | None = None) -> ModelEntry | None:
    """The most recent fine-tune (optionally only ``lora`` or ``merged``): the launcher's ``--use-finetuned``."""
    tuned = [e for e in list_models() if "finetuned" in e.tags and (kind is None or e.kind == kind)]
    return tuned[0] if tuned else None
