"""Merging an adapter that vLLM cannot load at runtime into a full model that it can serve.

The export area's ``merge_lora`` is the one implementation (atomic, disk-space checked, cancellable
between stages); this module only decides where a serving merge goes and whether it is still fresh.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

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


def merge_for_serving(adapter_dir: Path, base_dir: Path, out_dir: Path, fingerprint: str,
                      progress: Callable[[str, float], None] | None = None,
                      cancel_event: threading.Event | None = None) -> Path:
    """Merge ``adapter_dir`` into ``base_dir`` at ``out_dir`` (replacing it) and record the fingerprint.

    ``progress(stage, fraction)`` hears the merge's stages; ``cancel_event`` is honoured between them
    (``ExportCancelled``, and whatever was at ``out_dir`` is left as it was).
    """
    from sage_ft.export.merge import merge_lora

    merge_lora(adapter_dir, out_dir, overwrite=True, verify=False, progress=progress, cancel_event=cancel_event)
    (out_dir / MERGE_RECORD).write_text(json.dumps({"adapter": str(adapter_dir), "base": str(base_dir),
                                                    "adapter_fingerprint": fingerprint}, indent=2))
    return out_dir

