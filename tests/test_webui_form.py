"""The form generator: one component per config field, chosen from its type and metadata, and form
values back through TrainConfig's own validation (no second validator in the UI)."""

from __future__ import annotations

import dataclasses
import json

import gradio as gr
import pytest

from sage_ft.config import ConfigError, TrainConfig
from sage_ft.webui import form, form_memory, i18n
from sage_ft.webui.components import Registry

NAMES = TrainConfig.field_names()


def _non_default_configs() -> list[TrainConfig]:
    """Configs where every field differs from its default (so a round trip proves each one): val_size
    and eval_dataset exclude each other, so the second config sets eval_dataset instead."""
    config = _non_default_config()
    return [config, dataclasses.replace(config, val_size=0.0, eval_dataset="dev.jsonl")]


def _non_default_config() -> TrainConfig:
    """A config where every field but eval_dataset differs from its default."""
    config, _ = TrainConfig.from_dict({
        "model_name_or_path": "/models/x", "dataset": "a.jsonl,b.json", "learning_rate": 1e-4,
        "num_train_epochs": 2.5, "max_steps": 7, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 5,
        "dataset_format": "alpaca", "column_mapping": "instruction=q,output=a", "template": "chatml",
        "cutoff_len": 333, "max_samples": 11, "val_size": 0.1, "packing": False, "finetuning_type": "lora",
        "lora_rank": 16, "lora_alpha": 7, "lora_dropout": 0.05, "lora_target": "q_proj,v_proj", "use_rslora": True,
        "use_dora": True, "quantization_bit": 4, "quantization_type": "fp4", "double_quantization": False,
        "lr_scheduler_type": "linear", "warmup_ratio": 0.1, "warmup_steps": 3, "weight_decay": 0.01,
        "max_grad_norm": 0.5, "optim": "sgd", "seed": 7, "precision": "fp32", "gradient_checkpointing": True,
        "micro_batch_by_tokens": "off", "torch_compile": True,
        "logging_steps": 2, "save_steps": 9, "eval_steps": 4, "save_total_limit": None, "report_to": "tensorboard",
        "devices": "cpu", "num_processes": 2, "output_dir": "/tmp/out", "overwrite_output_dir": True,
        "resume_from_checkpoint": "last", "merge_lora": True, "run_name": "r"})
    return config


def test_each_field_gets_the_widget_its_type_and_metadata_ask_for():
    reg = Registry()
    with gr.Blocks():
        built = form.build_fields(NAMES, "en", reg)
    assert list(built) == NAMES
    assert isinstance(built["packing"], gr.Checkbox)
    assert isinstance(built["optim"], gr.Dropdown) and "sgd" in [c[1] for c in built["optim"].choices]
    assert isinstance(built["lora_rank"], gr.Number) and built["lora_rank"].precision == 0
    assert isinstance(built["learning_rate"], gr.Number) and built["learning_rate"].precision is None
    assert isinstance(built["lora_target"], gr.Textbox)
    assert isinstance(built["lora_alpha"], gr.Textbox) and built["lora_alpha"].value == ""  # optional number
    for name, component in built.items():
        assert component.label == f"{i18n.t(f'cfg.{name}.label', 'en')} ({name})"
        assert component.info.startswith(TrainConfig.ui(name).help), name
        assert reg[f"train.{name}"] is component
    assert "[≥ 1, ≤ 1024]" in built["lora_rank"].info
    assert "[> 0, ≤ 1]" in built["learning_rate"].info


def test_chinese_labels_and_help_come_from_zh_yaml():
    with gr.Blocks():
        component = form.field_component("lora_rank", "zh")
    assert component.label == "LoRA 秩 (lora_rank)"
    assert component.info.startswith(i18n.t("cfg.lora_rank.info", "zh"))


def test_values_round_trip_every_field():
    configs = _non_default_configs()
    assert all(any(getattr(c, n) != getattr(TrainConfig(), n) for c in configs)
               for n in NAMES if n not in ("finetuning_type", "save_total_limit"))
    for config in configs:
        values = form.config_to_values(config, NAMES)
        assert form.values_to_config(NAMES, values) == config


def test_widget_values_go_through_the_config_validation():
    values = form.config_to_values(TrainConfig(), NAMES)
    assert values[NAMES.index("lora_alpha")] == ""  # optional numbers live in a textbox: '' = unset
    values[NAMES.index("max_samples")] = None
    values[NAMES.index("lora_rank")] = 16.0  # a number box may send a float
    config = form.values_to_config(NAMES, values)
    assert config.lora_alpha is None and config.max_samples is None and config.lora_rank == 16
    values[NAMES.index("learning_rate")] = 0
    values[NAMES.index("optim")] = "adam-nope"
    with pytest.raises(ConfigError) as err:
        form.values_to_config(NAMES, values)
    text = "\n".join(err.value.problems)
    assert "learning_rate: 0 is too small" in text and "optim: 'adam-nope' is not allowed" in text


def test_the_form_memory_round_trips_a_valid_form_and_ignores_what_it_cannot_read(data_home):
    for config in _non_default_configs():
        draft = form_memory.remember(config)
        assert form_memory.recall(json.loads(json.dumps(draft))) == config  # what localStorage gives back
    assert form_memory.remember(TrainConfig()) == {}  # the defaults store nothing
    assert form_memory.recall(None) is None and form_memory.recall({}) is None and form_memory.recall("x") is None
    assert form_memory.recall({"lora_rank": -5}) is None  # out of range now: the form keeps its defaults
    assert form_memory.recall({"lora_rank": 16, "renamed_key": 1}).lora_rank == 16  # unknown keys are dropped


def test_the_browser_key_is_made_once_per_data_home_and_private(data_home):
    key = form_memory.browser_secret()
    path = data_home / "webui-form.key"
    assert len(key) >= 16 and path.read_text() == key and (path.stat().st_mode & 0o777) == 0o600
    assert form_memory.browser_secret() == key  # a restarted app still reads what browsers stored
