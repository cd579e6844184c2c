"""What the user asked to chat with: a base model, a run's adapter, a checkpoint, or a merged model.

``resolve_target`` turns a name or path into a ``ModelTarget`` (kind + where the weights are + which
base an adapter belongs to). ``runtime_lora_problems`` says why vLLM could not load an adapter at
runtime, so the manager can merge it instead and tell the user why.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sage_ft import paths
from sage_ft.export.source import EXPORT_RECORD

META_NAME = "finetune_meta.json"
ADAPTER_CONFIG = "adapter_config.json"
MERGED_DIR = "merged_model"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# vLLM's LoRA layers cover these projection names (Llama/Qwen/Mistral/Gemma/Phi style models).
SUPPORTED_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                     "qkv_proj", "gate_up_proj", "dense", "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
                     "c_attn", "c_proj", "c_fc", "fc1", "fc2", "out_proj", "w1", "w2", "w3", "wqkv", "wo"}
# vLLM accepts these ranks for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


class TargetError(ValueError):
    """The model to serve could not be understood: says which path and what is missing."""


Kind = Literal["base", "adapter", "merged"]


@dataclass(frozen=True)
class ModelTarget:
    kind: Kind
    path: Path  # model dir (base/merged) or adapter dir
    base_path: Path | None  # adapters: the base model directory they belong to
    label: str  # for people: "demo", "run-3", "run-3/checkpoint-200"
    run_dir: Path | None = None
    note: str = ""  # anything the user should know (e.g. "run has no final adapter; using checkpoint-40")
    merged_from: str = ""  # merged models: the base they were merged from, as recorded ("" when unknown)

    @property
    def serving_base(self) -> Path:
        """The model the server must load: the base for adapters, the path itself otherwise."""
        return self.base_path if self.kind == "adapter" and self.base_path else self.path


def adapter_fingerprint(adapter_dir: Path) -> str:
    """Changes whenever the adapter files change (size + mtime), so a retrained adapter gets a new name."""
    digest = hashlib.sha1(str(adapter_dir.resolve()).encode())
    for file in sorted(adapter_dir.glob("adapter_*")):
        stat = file.stat()
        digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:8]


def resolve_target(model: str | Path | ModelTarget) -> ModelTarget:
    """Understand ``model`` the same way for every client (Chat tab, CLI, tests): a directory; a name of
    the data home (a run, a model folder, an export, a task id ``7``/``#7`` or a task's name, a name
    the model registry lists); ``demo``; or a hub id. A ``ModelTarget`` is returned as it is."""
    if isinstance(model, ModelTarget):
        return model
    text = str(model or "").strip()
    if not text:
        raise TargetError("no model given; pass a model directory, a run directory, a checkpoint-N directory "
                          "or 'demo'")
    path = Path(text).expanduser()
    if path.exists():
        return _from_directory(path.resolve())
    named = named_model(text)
    if named is not None and Path(named).exists():
        return _from_directory(Path(named).resolve())
    return ModelTarget("base", _resolve_base(named or text), None, Path(text).name)


def named_model(name: str) -> str | None:
    """What a name stands for where a model is expected (a folder, or the hub id a registry name
    configures); None when it names nothing of the data home (then it is ``demo``, a hub id, or wrong).

    In this order: a folder of the data home's ``runs/``, ``models/`` or ``exports/`` of that name; a task
    id (``7``, ``#7``) or a task's name (its run); a name or label the model registry lists.
    """
    from sage_ft.models.demo import DEMO_NAME

    value = str(name).strip()
    if not value or value == DEMO_NAME or Path(value).expanduser().exists():
        return None
    if "/" not in value and value not in (".", ".."):
        for root in (paths.runs_dir(), paths.models_dir(), paths.exports_dir()):
            if (root / value).exists():
                return str(root / value)
    from sage_ft.tasks import TaskNotFound, task_run_dir

    try:
        run_dir = task_run_dir(value)
    except TaskNotFound as exc:
        raise TargetError(str(exc)) from None
    if run_dir is not None:
        return str(run_dir)
    from sage_ft.models.registry import find_model

    try:
        entry = find_model(value)
    except (OSError, ValueError):  # an unreadable models.yaml: the name is looked up no further
        entry = None
    return entry.path if entry is not None and entry.name != DEMO_NAME else None


def base_label(path: Path) -> str:
    """The people's name of a base model directory: the registry's ``demo`` for the built-in model (its
    folder is ``demo-tiny-llama``; one model, one name whichever way it was started), else the folder."""
    from sage_ft.models.demo import DEMO_NAME

    try:
        if path.resolve() == paths.demo_model_dir().resolve():
            return DEMO_NAME
    except OSError:
        pass
    return path.name


def _from_directory(path: Path) -> ModelTarget:
    if not path.is_dir():
        raise TargetError(f"{path} is a file; give a model, run or checkpoint directory")
    if (path / ADAPTER_CONFIG).is_file():
        run_dir = _run_dir_of(path)
        label = f"{run_dir.name}/{path.name}" if run_dir and path.parent == run_dir and path.name != "lora" else (
            run_dir.name if run_dir else path.name)
        return ModelTarget("adapter", path, _base_of_adapter(path, run_dir), label, run_dir)
    if (path / META_NAME).is_file() or (path / "lora").is_dir():
        return _from_run(path)
    if (path / EXPORT_RECORD).is_file():  # written by sage_ft.export.merge_lora
        return ModelTarget("merged", _check_model_dir(path), None, path.name, merged_from=merged_from(path))
    if path.name == MERGED_DIR and (path.parent / META_NAME).is_file():
        return ModelTarget("merged", _check_model_dir(path), None, f"{path.parent.name}/merged", path.parent,
                           merged_from=merged_from(path))
    return ModelTarget("base", _check_model_dir(path), None, base_label(path))


def _from_run(run_dir: Path) -> ModelTarget:
    lora = run_dir / "lora"
    if (lora / ADAPTER_CONFIG).is_file():
        return ModelTarget("adapter", lora, _base_of_adapter(lora, run_dir), run_dir.name, run_dir)
    checkpoints = sorted((int(m.group(1)), p) for p in run_dir.iterdir()
                         if (m := _CHECKPOINT.match(p.name)) and (p / ADAPTER_CONFIG).is_file())
    if checkpoints:
        step, ckpt = checkpoints[-1]
        return ModelTarget("adapter", ckpt, _base_of_adapter(ckpt, run_dir), f"{run_dir.name}/checkpoint-{step}",
                           run_dir, note=f"run {run_dir.name} has no final adapter yet; using its latest "
                                         f"checkpoint ({ckpt.name})")
    if (run_dir / MERGED_DIR / "config.json").is_file():
        return ModelTarget("merged", _check_model_dir(run_dir / MERGED_DIR), None, f"{run_dir.name}/merged", run_dir,
                           merged_from=merged_from(run_dir / MERGED_DIR))
    status = _read_meta(run_dir).get("status", "unknown")
    raise TargetError(f"run {run_dir} has no adapter to serve (no lora/{ADAPTER_CONFIG}, no checkpoint-N/, "
                      f"no {MERGED_DIR}/; run status: {status}). Wait for its first checkpoint or pick another run")


def _run_dir_of(adapter_dir: Path) -> Path | None:
    parent = adapter_dir.parent
    return parent if (parent / META_NAME).is_file() or (parent / "config.yaml").is_file() else None


def _read_meta(run_dir: Path) -> dict:
    try:
        data = json.loads((run_dir / META_NAME).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _base_of_adapter(adapter_dir: Path, run_dir: Path | None) -> Path:
    """The run's recorded base model (finetune_meta.json), else adapter_config's base_model_name_or_path."""
    tried = []
    if run_dir is not None:
        meta = _read_meta(run_dir)
        config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        for key in ("base_model_path", "base_model", "model_path", "model_name_or_path"):
            value = meta.get(key) or config.get(key)
            if isinstance(value, str) and value:
                tried.append(f"{run_dir / META_NAME}: {key}={value!r}")
                try:
                    return _resolve_base(value)
                except TargetError:
                    continue
    try:
        value = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as exc:
        raise TargetError(f"{adapter_dir / ADAPTER_CONFIG} cannot be read: {exc}") from None
    if isinstance(value, str) and value:
        tried.append(f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path={value!r}")
        try:
            return _resolve_base(value)
        except TargetError:
            pass
    raise TargetError(f"cannot find the base model of adapter {adapter_dir}; tried "
                      f"{'; '.join(tried) or 'nothing (no finetune_meta.json, no base_model_name_or_path)'}. "
                      "Make sure the base model directory still exists")


def merged_from(model_dir: Path) -> str:
    """The base a merged model was made from, from its record (an export's ``sage_ft_export.json``, a
    serving merge's record); "" when none is recorded."""
    from sage_ft.serving.merging import MERGE_RECORD

    for record, key in ((EXPORT_RECORD, "base_model"), (MERGE_RECORD, "base")):
        try:
            value = json.loads((model_dir / record).read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return base_label(Path(value)) if Path(value).is_absolute() else value
    return ""


def _resolve_base(name: str) -> Path:
    """A base model directory from a name/path (the models area's resolver when present)."""
    try:
        from sage_ft.models.resolve import ModelError, resolve_model
    except ImportError:  # the models area's resolver not installed: local directories and 'demo' only
        if name == "demo":
            from sage_ft.models.demo import ensure_demo_model

            return ensure_demo_model()
        return _check_model_dir(Path(name).expanduser())
    try:
        return resolve_model(name)
    except ModelError as exc:
        raise TargetError(str(exc)) from None


def _check_model_dir(path: Path) -> Path:
    if not (path / "config.json").is_file():
        raise TargetError(f"model directory {path} has no config.json; give a complete model folder "
                          "(as saved by save_pretrained), a run directory or a checkpoint-N directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise TargetError(f"model directory {path} has no weights (*.safetensors / *.bin)")
    return path.resolve()


def runtime_lora_problems(adapter_dir: Path, max_lora_rank: int) -> list[str]:
    """Why vLLM cannot load this adapter at runtime (empty list = it can)."""
    try:
        cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"{adapter_dir / ADAPTER_CONFIG} cannot be read: {exc}"]
    problems = []
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        problems.append(f"adapter type {cfg.get('peft_type')} is not LoRA")
    ranks = [int(cfg.get("r") or 0), *[int(v) for v in (cfg.get("rank_pattern") or {}).values()]]
    if max(ranks) > max_lora_rank:
        problems.append(f"LoRA rank {max(ranks)} is above the server's --max-lora-rank {max_lora_rank}")
    if cfg.get("use_dora"):
        problems.append("DoRA adapters cannot be loaded at runtime")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (fully trained modules) are not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append("LoRA bias is not supported")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [] if targets in ("all-linear",) else [targets]  # a regex: let vLLM judge at load time
    unsupported = sorted(t for t in targets if t.split(".")[-1] not in SUPPORTED_TARGETS)
    if unsupported:
        problems.append(f"target modules {unsupported} are not supported by vLLM's runtime LoRA")
    return problems
