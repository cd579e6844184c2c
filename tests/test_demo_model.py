"""The built-in demo model: offline, deterministic, loadable like any HF model, vLLM-compatible shape."""

from __future__ import annotations

import json
from pathlib import Path

from sage_ft.models.demo import build_demo_model, is_demo_model


def test_demo_model_is_a_normal_hf_directory(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_demo_model(tmp_path / "demo")
    assert is_demo_model(path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 64  # vLLM CPU attention
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello 你好"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello 你好<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text  # byte-level BPE: any text round-trips
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_demo_model_build_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    a = build_demo_model(tmp_path / "a")
    b = build_demo_model(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    mtime = (a / "model.safetensors").stat().st_mtime
    assert build_demo_model(a) == a and (a / "model.safetensors").stat().st_mtime == mtime
    assert not list(tmp_path.glob(".demo-build-*"))  # no staging leftovers
