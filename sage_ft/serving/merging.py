"""Merging an adapter that vLLM cannot load at runtime into a full model that it can serve.

The export area's ``merge_lora`` is the one implementation (atomic, verified, disk-space checked);
a minimal peft ``merge_and_unload`` is kept only for when that module is not installed.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

MERGE_RECORD = "sage_ft_serving_merge.json"


def merged_dir_for(adapter_dir: Path, run_dir: Path | None) -> Path:
    """``<run>/merged_model`` for a run's final adapter, ``<run>/merged_model-checkpoint-N`` for a checkpoint."""
    if run_dir is None:
        return adapter_dir.parent / f"{adapter_dir.name}-merged"
    if adapter_dir.name.startswith("checkpoint-"):
        return run_dir / f"merged_model-{adapter_dir.name}"
    return run_dir / "merged_model"


def is_fresh_merge(out_dir: Path, fingerprint: str) -> bool:
    """True when ``out_dir`` holds a merge of exactly this adapter version (skip re-merging)."""
    try:
        return json.loads((out_dir / MERGE_RECORD).read_text()).get("adapter_fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def merge_for_serving(adapter_dir: Path, base_dir: Path, out_dir: Path, fingerprint: str) -> Path:
    """Merge ``adapter_dir`` into ``base_dir`` at ``out_dir`` (replacing it) and record the fingerprint."""
    try:
        from sage_ft.export.merge import merge_lora
    except ImportError:
        merge_lora = None
    if merge_lora is not None:
        merge_lora(adapter_dir, out_dir, overwrite=True, verify=False)
    else:
        _peft_merge(adapter_dir, base_dir, out_dir)
    (out_dir / MERGE_RECORD).write_text(json.dumps({"adapter": str(adapter_dir), "base": str(base_dir),
                                                    "adapter_fingerprint": fingerprint}, indent=2))
    return out_dir


def _peft_merge(adapter_dir: Path, base_dir: Path, out_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
        merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base_dir
        AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
