"""The model card (README.md) of an export: where the model came from and how it was made.

Written from the run's ``finetune_meta.json`` so that a merged model copied elsewhere still says which
base, data, settings and metrics produced it, and whether the merge was verified.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sage_ft.export.source import ExportSource


def _yaml_block(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=True, allow_unicode=True, default_flow_style=False).rstrip()


def _metrics_table(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "_No final metrics were recorded._"
    rows = ["| metric | value |", "|---|---|"]
    for key, value in sorted(metrics.items()):
        shown = f"{value:.6g}" if isinstance(value, float) else str(value)
        rows.append(f"| {key} | {shown} |")
    return "\n".join(rows)


def render_model_card(source: ExportSource, dtype: str, created_at: str, verify: dict[str, Any] | None) -> str:
    """Markdown with a Hugging Face style YAML header."""
    meta = source.meta
    dataset = meta.get("dataset")
    front = {"base_model": str(source.base_model), "library_name": "transformers",
             "tags": ["sage-ft", "lora", "merged"], "pipeline_tag": "text-generation"}
    if verify is None:
        verify_text = "Not verified (verification was skipped)."
    else:
        state = "passed" if verify.get("ok") else "FAILED"
        details = verify.get("details", {})
        verify_text = (f"{state}: max |logit difference| {verify.get('max_abs_diff'):.3g} against base + adapter "
                       f"(tolerance {details.get('atol', float('nan')):.3g}, {details.get('prompts', '?')} prompts, "
                       f"top-1 agreement {details.get('top1_agreement', 0.0):.1%}).")
    lines = [
        "---", _yaml_block(front), "---", "",
        f"# {source.name} (merged)", "",
        "A LoRA fine-tune merged into its base model with sage-ft.", "",
        "## Provenance", "",
        f"- Base model: `{source.base_model}`",
        f"- Adapter: `{source.adapter_dir}`" + (f" ({source.checkpoint})" if source.checkpoint else ""),
        f"- Run status: {meta.get('status', 'unknown')}",
        f"- Dataset: {json.dumps(dataset, default=str) if dataset else 'not recorded'}",
        f"- Weights dtype: {dtype}",
        f"- Exported: {created_at}", "",
        "## Verification", "", verify_text, "",
        "## Training configuration", "",
        "```yaml", _yaml_block(meta.get("config") or {}), "```", "",
        "## Final metrics", "", _metrics_table(meta.get("final_metrics") or {}), "",
    ]
    return "\n".join(lines)


def write_model_card(directory: Path, source: ExportSource, dtype: str, created_at: str,
                     verify: dict[str, Any] | None) -> Path:
    path = Path(directory) / "README.md"
    path.write_text(render_model_card(source, dtype, created_at, verify), encoding="utf-8")
    return path
