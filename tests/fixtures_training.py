"""Shared fixtures of the training area (owned by that area).

- ``demo_model`` (session): the built demo model's directory.
- ``memorize_jsonl`` (session): a tiny Q/A set (alpaca format) whose answers a LoRA can memorise;
  ``MEMORIZE_QA`` holds the same pairs for assertions on generations.
- ``trained_run`` (session): the output directory of one short real LoRA run on the demo model with
  that set (completed: ``lora/``, ``checkpoint-30``/``-60``, meta, events, logs). Other areas (serving,
  export, UI) reuse it instead of training again. ~10 s on 2 cores.
- ``training_config(dataset, output_dir, **overrides)``: a fast CPU config for tests.
- ``generate(model_dir, question, adapter=None)``: greedy answer of the demo model (with an adapter).
- ``answer_loss(model_dir, question, answer, adapter=None)``: the model's mean loss on ``answer``'s tokens.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sage_ft.config import TrainConfig

MEMORIZE_QA = [
    ("What is the secret word?", "The secret word is pineapple."),
    ("Who guards the lighthouse?", "Old Captain Morrow guards it."),
    ("Which planet has rings?", "Saturn has bright rings."),
    ("Name the demo model.", "It is demo-tiny-llama."),
]
TRAINED_RUN_STEPS = 60
TRAINED_RUN_SAVE_STEPS = 30
TRAINED_RUN_LOGGING_STEPS = 5


def training_config(dataset: str | Path, output_dir: str | Path, **overrides: Any) -> TrainConfig:
    """A config that trains fast and deterministically on CPU (fp32, rank 32, high learning rate)."""
    values: dict[str, Any] = {
        "model_name_or_path": "demo", "dataset": str(dataset), "output_dir": str(output_dir),
        "learning_rate": 5e-3, "lora_rank": 32, "per_device_train_batch_size": 4, "max_steps": 20,
        "save_steps": 1000, "logging_steps": 1, "precision": "fp32", "devices": "cpu", "cutoff_len": 256,
    }
    values.update(overrides)
    config, unknown = TrainConfig.from_dict(values)
    assert not unknown, unknown
    return config


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from sage_ft.models.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def memorize_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("memorize") / "memorize.jsonl"
    rows = [{"instruction": q, "output": a} for q, a in MEMORIZE_QA]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_run(demo_model: Path, memorize_jsonl: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sage_ft.training import FineTuneRun

    out = tmp_path_factory.mktemp("trained") / "run"
    config = training_config(memorize_jsonl, out, max_steps=TRAINED_RUN_STEPS, save_steps=TRAINED_RUN_SAVE_STEPS,
                             logging_steps=TRAINED_RUN_LOGGING_STEPS, run_name="memorize")
    result = FineTuneRun(config).run()
    assert result.status == "completed", result.error
    return result.output_dir


def _load(model_dir: str | Path, adapter: str | Path | None) -> tuple[Any, Any]:
    """(model, tokenizer) of ``model_dir`` in full precision, with the LoRA ``adapter`` on it when given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model, tokenizer


def _prompt_inputs(tokenizer: Any, question: str) -> Any:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_tensors="pt", return_dict=True)


def generate(model_dir: str | Path, question: str, adapter: str | Path | None = None, max_new_tokens: int = 12) -> str:
    """Greedy completion of ``question`` (chat template applied), optionally through a LoRA adapter."""
    model, tokenizer = _load(model_dir, adapter)
    inputs = _prompt_inputs(tokenizer, question)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def answer_loss(model_dir: str | Path, question: str, answer: str, adapter: str | Path | None = None) -> float:
    """Mean cross-entropy of ``answer``'s tokens after ``question`` (chat template applied): how well the
    model (with ``adapter``) knows the answer, which greedy text shows only when every token is right."""
    import torch

    model, tokenizer = _load(model_dir, adapter)
    prompt = _prompt_inputs(tokenizer, question)["input_ids"]
    full = tokenizer.apply_chat_template([{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                                         return_tensors="pt", return_dict=True)["input_ids"]
    assert torch.equal(full[0, :prompt.shape[1]], prompt[0]), "the chat template does not extend the prompt"
    labels = full.clone()
    labels[0, :prompt.shape[1]] = -100
    with torch.no_grad():
        return float(model(input_ids=full, labels=labels).loss)
