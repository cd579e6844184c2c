"""Merge a run's LoRA adapter into its base model and write a standalone Hugging Face model.

The export is written into a hidden temporary sibling of the target and renamed at the end, so the
target is either absent or complete: a crash, a refusal or a cancel never leaves half a model that
the registry or vLLM would pick up. Space is checked before anything is loaded.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sage_ft import paths
from sage_ft.atomic import output_path_problem
from sage_ft.export.card import write_model_card
from sage_ft.export.served import refuse_if_served
from sage_ft.export.source import EXPORT_RECORD, ExportCancelled, ExportError, ExportSource, resolve_source
from sage_ft.export.verify import (
    VerifyResult,
    compare_logits,
    model_dtype_name,
    prompt_logits,
    render_prompts,
)

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_SHARD_SIZE = "2GB"
# Free space kept beyond the estimated export size (tokenizer, card, file-system slack).
DEFAULT_HEADROOM_BYTES = 256 * 1024**2
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

ProgressFn = Callable[[str, float], None]


@dataclass
class ExportResult:
    """What ``merge_lora`` wrote. ``verify`` is None when verification was skipped."""

    out_dir: Path
    dtype: str
    weight_files: list[str]
    size_bytes: int
    verify: VerifyResult | None
    source: str
    base_model: str
    seconds: float
    record: dict[str, Any] = field(default_factory=dict)


def parse_size(text: str | int) -> int:
    """'2GB' / '500MB' / '1.5GiB' / 1000000 -> bytes (decimal units, like transformers' max_shard_size)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        unit = match.group(2).upper() if match else None
        if not match or unit not in _SIZE_UNITS:
            raise ExportError(f"shard size {text!r} is not a size; write it like 2GB, 500MB or 1GiB")
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise ExportError(f"shard size must be positive, got {text!r}")
    return value


def count_parameters(model_dir: Path) -> int:
    """Parameters of a safetensors model, read from the file headers only (no weights loaded)."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir} has no *.safetensors weights; sage-ft exports safetensors models only")
    for path in files:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                count = 1
                for dim in info["shape"]:
                    count *= dim
                total += count
    return total


def resolve_dtype(dtype: str, base_model: Path) -> str:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    declared = model_dtype_name(base_model)
    return declared if declared in DTYPE_BYTES else "float32"


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(out_dir: Path, needed_bytes: int, min_free_bytes: int = DEFAULT_HEADROOM_BYTES) -> int:
    """Refuse unless the file system of ``out_dir`` has ``needed_bytes + min_free_bytes`` free.

    ``min_free_bytes`` is the headroom kept free after the export; tests make the check fail for real
    by asking for more headroom than any disk has. Returns the free bytes found.
    """
    free = shutil.disk_usage(_nearest_existing(out_dir)).free
    if free < needed_bytes + min_free_bytes:
        raise ExportError(
            f"not enough disk space for {out_dir}: the export needs about {needed_bytes / 1e9:.2f} GB "
            f"plus {min_free_bytes / 1e9:.2f} GB headroom, but only {free / 1e9:.2f} GB is free; "
            "free some space, pick another --out, or use a 2-byte dtype (bfloat16/float16)")
    return free


def default_out_dir(source: ExportSource) -> Path:
    return paths.exports_dir() / f"{source.name}-merged"


def _check_target(out_dir: Path, source: ExportSource, overwrite: bool, chat_manager: Any = None) -> None:
    problem = output_path_problem(out_dir)
    if problem is not None:  # mkdir would fail with a bare FileExistsError or OSError, after the merge
        raise ExportError(f"cannot export there: {problem}; choose another output")
    for protected in (source.base_model, source.adapter_dir, source.run_dir):
        if protected is not None and out_dir.resolve() == protected.resolve():
            raise ExportError(f"refusing to export into {out_dir}: it is the source model/run itself")
    if not out_dir.exists():
        return
    if out_dir.is_file():  # overwrite would not help: it replaces exports only
        raise ExportError(f"{out_dir} is a file, not an export directory; remove it or choose another output")
    if not overwrite:
        raise ExportError(f"{out_dir} already exists; choose another output directory or turn on overwrite "
                          "(--overwrite, or the Export tab's overwrite box) to replace it")
    if any(out_dir.iterdir()) and not (out_dir / EXPORT_RECORD).exists():
        raise ExportError(f"refusing to overwrite {out_dir}: it is not a sage-ft export (no {EXPORT_RECORD}); "
                          "remove it yourself or choose another output directory")
    refuse_if_served(out_dir, chat_manager)


class _Stages:
    """Reports progress and honours cancel between stages."""

    def __init__(self, progress: ProgressFn | None, cancel_event: threading.Event | None):
        self._progress, self._cancel = progress, cancel_event

    def enter(self, stage: str, fraction: float) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise ExportCancelled(f"export cancelled before stage {stage!r}; nothing was written")
        self.report(stage, fraction)

    def report(self, stage: str, fraction: float) -> None:
        if self._progress is not None:
            try:
                self._progress(stage, fraction)
            except Exception:  # a UI callback must never break an export
                log.exception("export progress callback failed")


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished staging dir into place; an old export is removed only after the swap."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{int(time.time() * 1000)}")
        out_dir.rename(old)
    staging.chmod(0o755)
    for path in staging.iterdir():
        if path.is_file():
            path.chmod(0o644)  # safetensors files come out 0600; a served model is read by others too
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def merge_lora(run_dir_or_adapter: str | Path, out_dir: str | Path | None = None, dtype: str = "auto",
               shard_size: str | int = DEFAULT_SHARD_SIZE, overwrite: bool = False,
               progress: ProgressFn | None = None, cancel_event: threading.Event | None = None,
               verify: bool = True, prompts: list[str] | None = None, atol: float | None = None,
               min_free_bytes: int = DEFAULT_HEADROOM_BYTES, chat_manager: Any = None) -> ExportResult:
    """Merge the adapter of a run / checkpoint / adapter dir into its base and write it to ``out_dir``.

    Stages reported to ``progress(stage, fraction)``: checking, loading, merging, saving, verifying,
    finishing, done. ``cancel_event`` is checked between stages. Raises ``ExportError`` on refusal,
    ``ExportCancelled`` on cancel; in both cases nothing is left at ``out_dir`` or beside it.
    An existing export is never overwritten while a chat server serves it (checked before the merge and
    again right before the swap): the vLLM servers of every live sage-ft process, and ``chat_manager``
    (this process's ``ServerManager``) when it chats in-process.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    stages = _Stages(progress, cancel_event)
    stages.enter("checking", 0.0)
    source = resolve_source(run_dir_or_adapter)
    dtype = resolve_dtype(dtype, source.base_model)
    max_shard = parse_size(shard_size)
    out_dir = Path(out_dir).expanduser().resolve() if out_dir else default_out_dir(source)
    _check_target(out_dir, source, overwrite, chat_manager)
    needed = count_parameters(source.base_model) * DTYPE_BYTES[dtype]
    check_disk_space(out_dir, needed, min_free_bytes)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        stages.enter("loading", 0.05)
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
        base = AutoModelForCausalLM.from_pretrained(source.base_model, dtype=getattr(torch, dtype))
        model = PeftModel.from_pretrained(base, source.adapter_dir).eval()
        texts = render_prompts(tokenizer, prompts)
        reference = prompt_logits(model, tokenizer, texts) if verify else None

        stages.enter("merging", 0.3)
        merged = model.merge_and_unload()
        del model, base

        stages.enter("saving", 0.45)
        merged.save_pretrained(staging, max_shard_size=max_shard, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if (source.base_model / "generation_config.json").exists():
            shutil.copy2(source.base_model / "generation_config.json", staging / "generation_config.json")
        del merged

        verify_result = None
        if verify:
            stages.enter("verifying", 0.7)
            reloaded = AutoModelForCausalLM.from_pretrained(staging, dtype=getattr(torch, dtype)).eval()
            verify_result = compare_logits(reference, prompt_logits(reloaded, tokenizer, texts), dtype, atol,
                                           reference="base+adapter", candidate="merged (as written)")
            del reloaded

        stages.enter("finishing", 0.9)
        created_at = datetime.now(UTC).isoformat(timespec="seconds")
        verify_dict = verify_result.to_dict() if verify_result else None
        write_model_card(staging, source, dtype, created_at, verify_dict)
        weight_files = sorted(p.name for p in staging.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in staging.iterdir() if p.is_file())
        record = _export_record(source, dtype, max_shard, created_at, weight_files, size, verify_dict)
        (staging / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
        stages.enter("finishing", 0.95)  # last cancel point: after this the export is in place
        if out_dir.exists():  # the chat may have switched to it while we merged
            refuse_if_served(out_dir, chat_manager)
        _replace_dir(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    stages.report("done", 1.0)
    return ExportResult(out_dir=out_dir, dtype=dtype, weight_files=weight_files, size_bytes=size,
                        verify=verify_result, source=str(source.run_dir or source.adapter_dir),
                        base_model=str(source.base_model), seconds=time.monotonic() - started, record=record)


def _export_record(source: ExportSource, dtype: str, max_shard: int, created_at: str, weight_files: list[str],
                   size: int, verify: dict[str, Any] | None) -> dict[str, Any]:
    """``sage_ft_export.json``: marks the directory as a merged export for the model registry."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sage_version = version("sage-ft")
    except PackageNotFoundError:
        sage_version = "unknown"
    return {
        "kind": "merged",
        "name": source.name,
        "source_run": str(source.run_dir) if source.run_dir else None,
        "adapter_dir": str(source.adapter_dir),
        "checkpoint": source.checkpoint,
        "base_model": str(source.base_model),
        "dataset": source.meta.get("dataset"),
        "run_status": source.meta.get("status"),
        "dtype": dtype,
        "max_shard_size_bytes": max_shard,
        "weight_files": weight_files,
        "size_bytes": size,
        "created_at": created_at,
        "sage_ft_version": sage_version,
        "verify": verify,
        "gguf": [],
    }


def read_export_record(export_dir: str | Path) -> dict[str, Any]:
    """The ``sage_ft_export.json`` of an export directory."""
    from sage_ft.export.source import read_json

    return read_json(Path(export_dir) / EXPORT_RECORD)
