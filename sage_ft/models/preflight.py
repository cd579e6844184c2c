"""Checks of a run config against its model's files, done before a task is queued.

Everything here reads small files only (config.json, tokenizer_config.json, safetensors headers), so
a bad combination is refused in a fraction of a second at Start instead of failing minutes later in
the queue. The run itself still checks the same facts on the loaded model (the source of truth).
"""

from __future__ import annotations

import json
from pathlib import Path

from sage_ft.config import TrainConfig

# Weight names that end in one of these are not linear layers LoRA can target.
_NOT_LINEAR = ("norm", "embed_tokens", "wte", "wpe", "lm_head", "rotary_emb", "bias")


def model_config_problems(config: TrainConfig, model_dir: Path) -> list[str]:
    """What in ``config`` cannot work with the model in ``model_dir`` (messages name key, value, fix)."""
    problems: list[str] = []
    try:
        model_cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []  # a missing/broken config.json is reported by the model directory check
    limit = model_cfg.get("max_position_embeddings")
    if isinstance(limit, int) and config.cutoff_len > limit:
        problems.append(f"cutoff_len: {config.cutoff_len} is above the model's context of {limit} tokens "
                        f"(max_position_embeddings); set cutoff_len to {limit} or less")
    targets = config.lora_targets
    if targets != "all-linear":
        available = linear_module_names(model_dir)
        missing = [t for t in targets if available and t not in available]
        if missing:
            problems.append(f"lora_target: {', '.join(missing)} matches no linear module of this model; "
                            f"available: {', '.join(sorted(available))} (or 'all')")
    if config.template == "auto" and not has_chat_template(model_dir):
        problems.append("template: the model's tokenizer has no chat template; set template to one of "
                        "chatml, llama3, qwen (e.g. template: chatml)")
    return problems


def linear_module_names(model_dir: Path) -> set[str]:
    """Leaf names of the 2-D weights (the linear layers), from the safetensors headers; {} if unknown."""
    from sage_ft.estimate import safetensors_tensors

    names = set()
    for name, (shape, _dtype) in safetensors_tensors(model_dir).items():
        parts = name.split(".")
        if len(shape) == 2 and len(parts) >= 2 and parts[-1] == "weight" and not parts[-2].endswith(_NOT_LINEAR):
            names.add(parts[-2])
    return names


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer ships a chat template (any of the places transformers reads it from)."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    try:
        tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True  # unknown: let the run's own check decide rather than refuse a good model
    return bool(tok_cfg.get("chat_template"))
