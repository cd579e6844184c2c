"""Checks that an exported model computes what the model it came from computes.

An export is only worth shipping if it answers like the thing the user trained: we run the same
prompts through both models and compare next-token logits at every position. The tolerance scales
with the logits' magnitude and with the dtype's precision (bf16 keeps 8 mantissa bits, so a merged
bf16 weight legitimately differs from base + B@A evaluated separately).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sage_ft.export.source import ExportSource, read_json, resolve_source

DEFAULT_PROMPTS = (
    "Hello! How are you?",
    "What is the capital of France?",
    "Explain in one sentence what fine-tuning a language model means.",
)
# max |diff| allowed, as a fraction of max(1, max |reference logit|), per computation dtype
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}


@dataclass
class VerifyResult:
    """``ok`` when every logit agrees within ``details['atol']``; ``details`` says on what."""

    ok: bool
    max_abs_diff: float
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render_prompts(tokenizer, prompts: list[str] | tuple[str, ...] | None = None) -> list[str]:
    """The prompts as the model sees them in chat: through its chat template when it has one."""
    prompts = list(prompts or DEFAULT_PROMPTS)
    if not getattr(tokenizer, "chat_template", None):
        return prompts
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True) for p in prompts]


def prompt_logits(model, tokenizer, texts: list[str]) -> list:
    """float32 logits for each text, one forward pass each (no padding to get wrong)."""
    import torch

    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out.append(model(input_ids=ids).logits[0].float())
    return out


def compare_logits(expected: list, actual: list, dtype: str, atol: float | None = None,
                   **details: Any) -> VerifyResult:
    """Compare two lists of logits tensors (same prompts, same order)."""
    max_diff, max_ref, agree, positions = 0.0, 0.0, 0, 0
    for ref, got in zip(expected, actual, strict=True):
        if ref.shape != got.shape:
            return VerifyResult(False, float("inf"), {**details, "error": f"logits shape {tuple(got.shape)} "
                                                      f"differs from the reference {tuple(ref.shape)}"})
        max_diff = max(max_diff, float((ref - got).abs().max()))
        max_ref = max(max_ref, float(ref.abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += ref.shape[0]
    if atol is None:
        atol = RELATIVE_TOLERANCE.get(dtype, RELATIVE_TOLERANCE["float32"]) * max(1.0, max_ref)
    ok = max_diff <= atol
    return VerifyResult(ok, max_diff, {**details, "atol": atol, "dtype": dtype, "prompts": len(expected),
                                       "positions": positions, "max_abs_reference_logit": max_ref,
                                       "top1_agreement": agree / positions if positions else 0.0})


def model_dtype_name(model_dir: Path) -> str:
    """The dtype a HF model directory declares (``dtype`` in transformers 5, ``torch_dtype`` before)."""
    config = read_json(Path(model_dir) / "config.json")
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def load_base_with_adapter(source: ExportSource, dtype: str):
    """The base model with the LoRA adapter applied (not merged): the reference an export must match."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(source.base_model, dtype=getattr(torch, dtype))
    return PeftModel.from_pretrained(base, source.adapter_dir).eval()


def verify_merge(run_dir_or_adapter: str | Path | ExportSource, merged_dir: str | Path,
                 prompts: list[str] | None = None, atol: float | None = None) -> VerifyResult:
    """Logits of base + adapter against the merged model in ``merged_dir``, in the merged model's dtype."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = run_dir_or_adapter if isinstance(run_dir_or_adapter, ExportSource) else resolve_source(run_dir_or_adapter)
    merged_dir = Path(merged_dir)
    dtype = model_dtype_name(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    texts = render_prompts(tokenizer, prompts)
    reference_model = load_base_with_adapter(source, dtype)
    reference = prompt_logits(reference_model, tokenizer, texts)
    del reference_model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=getattr(torch, dtype)).eval()
    candidate = prompt_logits(merged, tokenizer, texts)
    return compare_logits(reference, candidate, dtype, atol, reference="base+adapter", candidate=str(merged_dir))
