"""TrainConfig: YAML round trip, LLaMA-Factory keys, CLI overrides and error messages."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from sage_ft.config import ConfigError, TrainConfig, closest_key, parse_overrides, unknown_key_warning

LLAMA_FACTORY_YAML = """\
### model
model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
trust_remote_code: true

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 16
lora_target: all

### dataset
dataset: data/identity.json,data/alpaca_en_demo.json
template: qwen
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16

### output
output_dir: saves/qwen2.5-0.5b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""


def test_llama_factory_yaml_loads_and_reports_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "lf.yaml"
    path.write_text(LLAMA_FACTORY_YAML)
    config, unknown = TrainConfig.from_yaml(path)
    assert config.model_name_or_path == "Qwen/Qwen2.5-0.5B-Instruct"
    assert config.lora_rank == 16 and config.effective_lora_alpha == 32
    assert config.datasets == ["data/identity.json", "data/alpaca_en_demo.json"]
    assert config.learning_rate == pytest.approx(1e-4)
    assert config.precision == "bf16"
    assert config.template == "qwen"
    assert config.lora_targets == "all-linear"
    assert unknown == ["save_only_model"]


def test_yaml_round_trip_is_identical(tmp_path: Path) -> None:
    config, _ = TrainConfig.from_dict({"dataset": "a.jsonl", "lora_rank": 32, "max_samples": 7,
                                       "lora_target": "q_proj,v_proj", "precision": "fp32"})
    path = config.save_yaml(tmp_path / "c.yaml")
    again, unknown = TrainConfig.from_yaml(path)
    assert again == config and unknown == []
    assert again.to_yaml() == config.to_yaml()
    assert again.lora_targets == ["q_proj", "v_proj"]


def test_command_round_trip() -> None:
    config, _ = TrainConfig.from_dict({"dataset": "my data.jsonl", "learning_rate": 3e-5, "packing": False,
                                       "max_samples": None, "run_name": "héllo wörld"})
    argv = shlex.split(config.to_command())
    assert argv[:2] == ["sage-ft", "train"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    again, _ = TrainConfig.from_dict(parse_overrides(sets))
    assert again == config


def test_command_against_a_config_file_lists_only_differences(tmp_path: Path) -> None:
    base, _ = TrainConfig.from_dict({"dataset": "a.jsonl", "lora_rank": 16})
    path = base.save_yaml(tmp_path / "base.yaml")
    changed, _ = TrainConfig.from_dict({**base.to_dict(), "learning_rate": 1e-3})
    assert changed.to_argv(path) == ["sage-ft", "train", str(path), "--set", "learning_rate=0.001"]


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"learning_rate": -1}, "learning_rate: -1 is too small; it must be > 0"),
        ({"learning_rate": 0}, "learning_rate: 0 is too small; it must be > 0"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size: 0 is too small; it must be >= 1"),
        ({"per_device_train_batch_size": "four"}, "per_device_train_batch_size: 'four' is not a whole number"),
        ({"lora_rank": 2.5}, "lora_rank: 2.5 is not a whole number"),
        ({"packing": "maybe"}, "packing: 'maybe' is not true or false"),
        ({"lr_scheduler_type": "zigzag"}, "lr_scheduler_type: 'zigzag' is not allowed; choose one of linear, cosine"),
        ({"max_steps": 0}, "max_steps: 0 would train nothing"),
        ({"stage": "dpo"}, "stage: 'dpo' is not supported"),
        ({"lora_target": " "}, "lora_target: empty"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(values: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"dataset": "x.jsonl", **values})
    assert fragment in str(err.value)


def test_every_bad_key_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"learning_rate": "fast", "lora_rank": "big"})
    assert len(err.value.problems) == 2


def test_strict_mode_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="lora_rnak: unknown key \\(did you mean 'lora_rank'\\?\\)"):
        TrainConfig.from_dict({"lora_rnak": 8}, strict=True)


def test_unknown_keys_name_the_key_they_likely_meant() -> None:
    """Typos and other tools' names get a hint; unrelated keys get none (a wrong hint misleads)."""
    assert closest_key("lerning_rate") == "learning_rate" and closest_key("lora_dropuot") == "lora_dropout"
    assert closest_key("micro_batch_size") == "per_device_train_batch_size"  # axolotl's name
    assert closest_key("num_epochs") == "num_train_epochs" and closest_key("sequence_len") == "cutoff_len"
    for unrelated in ("mystery_key", "save_only_model", "deepspeed", "flash_attn"):
        assert closest_key(unrelated) is None, unrelated
    assert "did you mean 'learning_rate'?" in unknown_key_warning("lerning_rate")
    assert "did you mean" not in unknown_key_warning("mystery_key")


def test_yaml_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("lora_rank: 8\nlearning_rate: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+, column \d+ invalid YAML"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ConfigError, match="file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.from_yaml(tmp_path / "list.yaml")


def test_overrides_need_key_equals_value() -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["learning_rate"])


def test_every_field_has_help_and_a_group() -> None:
    for f in TrainConfig.fields():
        ui = TrainConfig.ui(f.name)
        assert ui.help and ui.group in ("basic", "data", "lora", "advanced", "output")


def test_llama_factory_quantization_keys() -> None:
    """LLaMA-Factory's QLoRA keys load as they are written there: ``quantization_bit: 4`` (a number),
    null for none, ``quantization_method: bitsandbytes``; another method is refused by name."""
    four, _ = TrainConfig.from_dict({"quantization_bit": 4, "quantization_method": "bitsandbytes",
                                     "quantization_type": "nf4", "double_quantization": False})
    assert (four.quantization_bit, four.quantization_bits, four.double_quantization) == ("4", 4, False)
    assert TrainConfig.from_dict({"quantization_bit": None})[0].quantization_bits is None
    assert TrainConfig.from_dict({"quantization_bit": "8"})[0].quantization_bits == 8
    with pytest.raises(ConfigError, match="quantization_bit: '3' is not allowed; choose one of none, 8, 4"):
        TrainConfig.from_dict({"quantization_bit": 3})
    with pytest.raises(ConfigError, match="quantization_method: 'hqq' is not supported"):
        TrainConfig.from_dict({"quantization_bit": 4, "quantization_method": "hqq"})


@pytest.mark.parametrize("key", ["learning_rate", "num_train_epochs", "val_size", "warmup_ratio", "lora_dropout"])
def test_nan_is_refused_by_name(key: str) -> None:
    """NaN passes every range check (each comparison is false): it was queued and failed the run with
    a traceback, or, as lora_dropout, trained. YAML's .nan and the CLI's 'nan' are both refused."""
    for value in ("nan", float("nan")):
        with pytest.raises(ConfigError, match=f"{key}: .*nan'? is not a number"):
            TrainConfig.from_dict({key: value})


def test_devices_must_name_auto_cpu_or_gpu_ids() -> None:
    """'gpu' used to be queued and then failed the task with a traceback from the launcher."""
    assert TrainConfig.from_dict({"devices": " 0, 1"})[0].devices == " 0, 1"
    for bad in ("gpu", "cuda:0", "0;1"):
        with pytest.raises(ConfigError, match=f"devices: '{bad}'; use 'auto', 'cpu' or GPU ids like '0,1'"):
            TrainConfig.from_dict({"devices": bad})


def test_a_whole_number_written_with_a_decimal_point_is_accepted_everywhere() -> None:
    """YAML's ``lora_rank: 8.0`` loaded while ``--set lora_rank=8.0`` was refused; both are 8 now."""
    assert TrainConfig.from_dict(parse_overrides(["lora_rank=8.0", "max_steps=1e3"]))[0].lora_rank == 8
    assert TrainConfig.from_dict({"lora_rank": 8.0})[0].lora_rank == 8
    for bad in ("8.5", "eight"):
        with pytest.raises(ConfigError, match=f"lora_rank: '{bad}' is not a whole number"):
            TrainConfig.from_dict(parse_overrides([f"lora_rank={bad}"]))


def test_a_mistyped_set_key_is_an_error_and_a_yaml_unknown_key_a_warning(tmp_path: Path) -> None:
    """``--set learning_rat=1e-3`` only warned, and the run trained at the default learning rate: a key
    typed on the command line is an error naming the key it likely meant. Unknown keys inside a YAML
    file (LLaMA-Factory's own) stay warnings; LLaMA-Factory's spellings are accepted after --set too."""
    path = tmp_path / "run.yaml"
    path.write_text("dataset: a.jsonl\nsave_only_model: false\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(path, ["learning_rat=1e-3", "lora_rank=0"])
    assert err.value.problems[0].startswith("--set learning_rat: unknown config key (did you mean 'learning_rate'?)")
    assert any(p.startswith("lora_rank: 0 is too small") for p in err.value.problems)  # reported together
    with pytest.raises(ConfigError, match="--set mystery: unknown config key; see"):
        parse_overrides(["mystery=1"])
    config, unknown = TrainConfig.from_yaml(path, ["learning_rate=1e-3", "bf16=true", "do_train=true"])
    assert (config.learning_rate, config.precision, unknown) == (1e-3, "bf16", ["save_only_model"])
    with pytest.raises(ConfigError, match="did you mean 'lora_rank'"):
        TrainConfig.from_overrides(["lora_rnak=4"])


def test_type_range_and_choice_problems_are_reported_together(tmp_path: Path) -> None:
    """Only ``learning_rate: 'abc' is not a number`` was shown for a file with four mistakes: the
    range and choice checks ran only once every value had its type."""
    path = tmp_path / "bad.yaml"
    path.write_text("learning_rate: abc\nnum_train_epochs: -1\nlora_rank: 0\ntemplate: vicuna\nstage: dpo\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(path)
    keys = sorted(p.split(":")[0] for p in err.value.problems)
    assert keys == ["learning_rate", "lora_rank", "num_train_epochs", "stage", "template"]
    assert "learning_rate: 'abc' is not a number" in err.value.problems


def test_val_size_and_eval_dataset_exclude_each_other():
    TrainConfig(dataset="a.jsonl", eval_dataset="dev.jsonl").validate()
    TrainConfig(dataset="a.jsonl", val_size=0.1).validate()
    with pytest.raises(ConfigError, match="val_size: 0.1 holds rows of dataset out for the eval loss while "
                                          "eval_dataset gives other rows"):
        TrainConfig(dataset="a.jsonl", val_size=0.1, eval_dataset="dev.jsonl").validate()
