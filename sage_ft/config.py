"""The one typed configuration of a fine-tuning run.

``TrainConfig`` is the single source for the Train form, the YAML file, the CLI flags and the
command preview: each field declares its default, type, allowed values, range and help text once,
in its metadata (``ui``). Key names follow LLaMA-Factory's training YAML where the concept is the
same, so a user's LLaMA-Factory SFT+LoRA file loads (unknown keys in a file are reported, not fatal;
a key typed after ``--set`` must be known).

Precedence, as in trl's ``TrlParser``: field defaults < YAML file < ``--set key=value``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from sage_ft.data.load import FILE_TYPES

Group = Literal["basic", "data", "lora", "advanced", "output"]


@dataclass(frozen=True)
class UI:
    """Facts about a field that the form, the CLI help and the validator share."""

    group: Group
    help: str
    choices: tuple[Any, ...] | None = None
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    widget: str | None = None  # override of the widget picked from the type (e.g. "slider")
    step: float | None = None


def _f(default: Any, group: Group, help: str, **ui: Any) -> Any:
    return field(default=default, metadata={"ui": UI(group=group, help=help, **ui)})


class ConfigError(ValueError):
    """A config value that cannot be used; names the key, the value and what is allowed."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("Invalid configuration:\n  - " + "\n  - ".join(problems))


# LLaMA-Factory keys that map onto ours with a different shape.
_PRECISION_ALIASES = ("bf16", "fp16", "pure_bf16")
# Keys LLaMA-Factory writes that are meaningless here but harmless: accepted silently.
_IGNORED_KEYS = frozenset({"do_train", "overwrite_cache", "preprocessing_num_workers", "plot_loss",
                           "ddp_timeout", "trust_remote_code", "dataset_dir", "dataloader_num_workers"})

LORA_RANKS_SERVABLE = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed --max-lora-rank


def comma_list(text: str) -> list[str]:
    """``"a.jsonl, b.jsonl,"`` -> ``["a.jsonl", "b.jsonl"]``: the items of a comma-separated field."""
    return [item.strip() for item in text.split(",") if item.strip()]


@dataclass
class TrainConfig:
    """Everything a LoRA supervised fine-tuning run needs. ``validate()`` is the only validator."""

    # --- basic ---
    model_name_or_path: str = _f("demo", "basic", "Base model: a local directory, a Hugging Face id, or 'demo' for the built-in tiny model.")
    dataset: str = _f("", "basic", f"Training data, comma separated: {FILE_TYPES} files or folders, names in the data home, 'docs-sample', or a Hugging Face dataset id in the local cache.")
    learning_rate: float = _f(2e-4, "basic", "Peak learning rate of the optimizer.", min=0, min_exclusive=True, max=1.0)
    num_train_epochs: float = _f(3.0, "basic", "Passes over the data (ignored when max_steps > 0).", min=0, min_exclusive=True, max=1000)
    max_steps: int = _f(-1, "basic", "Stop after this many optimizer steps; -1 = use num_train_epochs.", min=-1)
    per_device_train_batch_size: int = _f(4, "basic", "Samples per device per micro-batch (one forward/backward); batch x accumulation = samples per optimizer step.", min=1, max=4096)
    gradient_accumulation_steps: int = _f(1, "basic", "Micro-batches of 'batch' samples per optimizer step (fewer on GPUs when their samples are short: micro_batch_by_tokens).", min=1, max=4096)
    # --- data ---
    dataset_format: str = _f("auto", "data", "Dataset layout; auto detects alpaca, sharegpt or openai messages.",
                             choices=("auto", "alpaca", "sharegpt", "openai"))
    column_mapping: str = _f("", "data", "Other field names, e.g. 'instruction=prompt,output=answer'.")
    template: str = _f("auto", "data", "Chat template: auto = the model's own, else a built-in one.",
                       choices=("auto", "chatml", "llama3", "qwen"))
    cutoff_len: int = _f(1024, "data", "Maximum tokens per sample; longer samples are truncated.", min=8, max=1_048_576)
    max_samples: int | None = _f(None, "data", "Use at most this many samples (empty = all).", min=1)
    val_size: float = _f(0.0, "data", "Fraction (0-1) or count (>1) of samples held out for eval loss.", min=0)
    eval_dataset: str = _f("", "data", "Separate data for the eval loss, instead of val_size, in dataset's forms; a folder or Hugging Face dataset id means its test/validation split.")
    packing: bool = _f(True, "data", "Pack several samples per row (no cross-sample attention) when the model supports it.")
    # --- lora ---
    finetuning_type: str = _f("lora", "lora", "Fine-tuning method (sage-ft trains LoRA adapters).", choices=("lora",))
    lora_rank: int = _f(8, "lora", "LoRA rank r: adapter capacity; vLLM serves ranks up to its --max-lora-rank.", min=1, max=1024)
    lora_alpha: int | None = _f(None, "lora", "LoRA scaling alpha (empty = 2 x rank).", min=1)
    lora_dropout: float = _f(0.0, "lora", "Dropout on the LoRA path.", min=0, max=1)
    lora_target: str = _f("all", "lora", "Modules to adapt: 'all' linear layers or names like 'q_proj,v_proj'.")
    use_rslora: bool = _f(False, "lora", "Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = _f(False, "lora", "Weight-decomposed LoRA (DoRA); slower, not servable by vLLM at runtime.")
    quantization_bit: str = _f("none", "lora", "Load the base model's linear layers quantized with bitsandbytes and train the LoRA on top: 4 = QLoRA (about a quarter of their weight memory), 8 = about half; a little slower per step and slightly less exact. The adapter is served and merged on the full-precision base.", choices=("none", "8", "4"))
    quantization_type: str = _f("nf4", "lora", "4-bit data type: nf4 (normal float, QLoRA's) or fp4.", choices=("nf4", "fp4"))
    double_quantization: bool = _f(True, "lora", "4-bit: quantize the quantization constants too (saves about 0.4 bits per weight).")
    # --- advanced ---
    lr_scheduler_type: str = _f("cosine", "advanced", "Learning-rate schedule.",
                                choices=("linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"))
    warmup_ratio: float = _f(0.0, "advanced", "Fraction of steps spent warming up the learning rate.", min=0, max=1)
    warmup_steps: int = _f(0, "advanced", "Warm-up steps (overrides warmup_ratio when > 0).", min=0)
    weight_decay: float = _f(0.0, "advanced", "AdamW weight decay.", min=0, max=1)
    max_grad_norm: float = _f(1.0, "advanced", "Gradient clipping norm (0 = off).", min=0)
    optim: str = _f("adamw_torch", "advanced", "Optimizer.", choices=("adamw_torch", "adamw_torch_fused", "sgd", "adafactor"))
    seed: int = _f(42, "advanced", "Random seed for data order and adapter init.", min=0)
    precision: str = _f("auto", "advanced", "Compute precision; auto = bf16 where the device supports it, else fp32.",
                        choices=("auto", "bf16", "fp16", "fp32"))
    gradient_checkpointing: bool = _f(False, "advanced", "Recompute activations to save memory (slower).")
    micro_batch_by_tokens: str = _f("auto", "advanced", "With gradient accumulation > 1: split each step's batch x accumulation samples into as few micro-batches as fit batch x the longest sample's tokens (no more memory), so steps of short samples take fewer forward/backward passes; same samples and loss per step. auto = on for GPUs (a small model's pass is bound by kernel launches there), off on CPUs (compute-bound; measured a few percent slower from coarser length groups).", choices=("auto", "on", "off"))
    torch_compile: bool = _f(False, "advanced", "Compile each decoder layer with torch.compile: less host work per step (for GPUs, where small models are launch-bound); the first step takes up to a minute longer. On CPU only a few percent faster: worth it for long runs.")
    logging_steps: int = _f(1, "advanced", "Log loss and learning rate every N steps.", min=1)
    save_steps: int = _f(50, "advanced", "Save a checkpoint every N steps.", min=1)
    eval_steps: int | None = _f(None, "advanced", "Evaluate every N steps when val_size > 0 or eval_dataset is set (empty = save_steps).", min=1)
    save_total_limit: int | None = _f(3, "advanced", "Keep at most this many checkpoints (empty = all).", min=1)
    report_to: str = _f("none", "advanced", "Extra experiment trackers.", choices=("none", "tensorboard", "wandb"))
    devices: str = _f("auto", "advanced", "Where to train: 'auto' (GPU if present), 'cpu', or GPU ids like '0,1'.")
    num_processes: int = _f(1, "advanced", "Data-parallel processes; > 1 launches the run with `accelerate launch` (DDP).", min=1, max=64)
    # --- output ---
    output_dir: str = _f("", "output", "Run directory (empty = a new folder under the data home's runs/; a "
                         "relative one is under runs/ in the web UI, under the current folder on the command line).")
    overwrite_output_dir: bool = _f(False, "output", "Allow writing into an existing, non-empty output_dir.")
    resume_from_checkpoint: str | None = _f(None, "output", "'last' or a checkpoint directory to resume from.")
    merge_lora: bool = _f(False, "output", "Also write merged_model/ (base + adapter) when the run completes.")
    run_name: str = _f("", "output", "A short name shown in the task list (empty = derived from model and dataset).")

    # ------------------------------------------------------------------ construction
    @classmethod
    def fields(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def ui(cls, name: str) -> UI:
        return _FIELDS[name].metadata["ui"]

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, strict: bool = False) -> tuple[TrainConfig, list[str]]:
        """Build a validated config from plain values (YAML, form, CLI).

        Returns the config and the unknown keys (a warning to show the user). With ``strict``
        unknown keys are an error. Every problem is reported at once in one ``ConfigError``: values
        that are not of their type, and the range, choice and cross-field problems of the others (a
        file with four mistakes used to show the first type error only, and the next three one
        attempt at a time).
        """
        data = dict(data or {})
        problems = _apply_aliases(data)
        unknown = sorted(k for k in data if k not in _FIELDS and k not in _IGNORED_KEYS)
        if strict and unknown:
            problems += [f"{k}: unknown key{_did_you_mean(k)} (known keys: see `sage-ft train --help-config`)"
                         for k in unknown]
        values: dict[str, Any] = {}
        for name, value in data.items():
            if name not in _FIELDS:
                continue
            try:
                values[name] = coerce(name, value)
            except ValueError as exc:
                problems.append(str(exc))
        config = cls(**values)  # the keys whose value could not be read keep their default here
        try:
            config.validate()
        except ConfigError as exc:
            problems += exc.problems
        if problems:
            raise ConfigError(problems)
        return config, unknown

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> tuple[TrainConfig, list[str]]:
        """Load a YAML file (LLaMA-Factory style keys accepted) and apply ``key=value`` overrides."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError([f"{path}: file not found"]) from None
        except UnicodeDecodeError as exc:
            raise ConfigError([f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError([f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: expected a mapping of key: value, got {type(data).__name__}"])
        return cls.from_overrides(overrides or [], base=data)

    @classmethod
    def from_overrides(cls, overrides: list[str], base: dict[str, Any] | None = None) -> tuple[TrainConfig, list[str]]:
        """``base`` (a YAML file's values, or nothing) changed by ``--set key=value`` items. The command
        line's problems (a mistyped key) and the values' problems are reported together."""
        typed, problems = _read_overrides(overrides)
        try:
            config, unknown = cls.from_dict({**(base or {}), **typed})
        except ConfigError as exc:
            raise ConfigError(problems + exc.problems) from None
        if problems:
            raise ConfigError(problems)
        return config, unknown

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check ranges, choices and cross-field rules; raise one ``ConfigError`` listing all."""
        problems: list[str] = []
        for f in dataclasses.fields(self):
            ui: UI = f.metadata["ui"]
            value = getattr(self, f.name)
            if value is None:
                continue
            if ui.choices is not None and value not in ui.choices:
                problems.append(f"{f.name}: {value!r} is not allowed; choose one of {', '.join(map(str, ui.choices))}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if ui.min is not None and (value < ui.min or (ui.min_exclusive and value == ui.min)):
                    op = ">" if ui.min_exclusive else ">="
                    problems.append(f"{f.name}: {_num(value)} is too small; it must be {op} {_num(ui.min)}")
                if ui.max is not None and value > ui.max:
                    problems.append(f"{f.name}: {_num(value)} is too large; it must be <= {_num(ui.max)}")
        if not self.model_name_or_path.strip():
            problems.append("model_name_or_path: empty; give a model directory, a Hugging Face id or 'demo'")
        if self.max_steps == 0:
            problems.append("max_steps: 0 would train nothing; use -1 (epochs) or a positive number")
        if gpu_ids(self.devices) is None:
            problems.append(devices_problem(self.devices))
        if not self.lora_target.strip():
            problems.append("lora_target: empty; use 'all' or module names such as 'q_proj,v_proj'")
        if self.eval_datasets and self.val_size > 0:
            problems.append(f"val_size: {_num(self.val_size)} holds rows of dataset out for the eval loss while "
                            "eval_dataset gives other rows for it; set one of them (val_size 0 to use eval_dataset)")
        if problems:
            raise ConfigError(problems)

    # ------------------------------------------------------------------ derived values
    @property
    def effective_lora_alpha(self) -> int:
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

    def held_out(self, n_samples: int) -> int:
        """How many of ``n_samples`` ``val_size`` holds out for the eval loss (a fraction < 1 or a count)."""
        if self.val_size <= 0:
            return 0
        return int(self.val_size) if self.val_size >= 1 else max(1, round(n_samples * self.val_size))

    @property
    def quantization_bits(self) -> int | None:
        """4 or 8 when the base model is loaded quantized, else None."""
        return None if self.quantization_bit == "none" else int(self.quantization_bit)

    @property
    def datasets(self) -> list[str]:
        return comma_list(self.dataset)

    @property
    def eval_datasets(self) -> list[str]:
        return comma_list(self.eval_dataset)

    @property
    def lora_targets(self) -> str | list[str]:
        """peft's ``target_modules``: 'all-linear' or a list of module names."""
        if self.lora_target.strip().lower() in ("all", "all-linear"):
            return "all-linear"
        return comma_list(self.lora_target)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self, *, only_changed: bool = False) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if only_changed:
            defaults = TrainConfig()
            out = {k: v for k, v in out.items() if v != getattr(defaults, k)}
        return out

    def to_yaml(self, *, only_changed: bool = False) -> str:
        return yaml.safe_dump(self.to_dict(only_changed=only_changed), sort_keys=False, allow_unicode=True)

    def save_yaml(self, path: str | Path) -> Path:
        from sage_ft.atomic import atomic_writer

        path = Path(path)
        with atomic_writer(path) as fh:
            fh.write(self.to_yaml())
        return path

    def to_argv(self, config_path: str | Path | None = None) -> list[str]:
        """The exact ``sage-ft train`` command for this config (the UI's command preview).

        With ``config_path`` the command names that file and adds ``--set`` only for values that
        differ from it; without, every non-default value becomes a ``--set``.
        """
        argv = ["sage-ft", "train"]
        base: dict[str, Any] = TrainConfig().to_dict()
        if config_path is not None:
            argv.append(str(config_path))
            base = TrainConfig.from_yaml(config_path)[0].to_dict()
        for key, value in self.to_dict().items():
            if value != base[key]:
                argv += ["--set", f"{key}={format_value(value)}"]
        return argv

    def to_command(self, config_path: str | Path | None = None) -> str:
        return shlex.join(self.to_argv(config_path))


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# Other tools' names (axolotl, TRL) for keys sage-ft calls otherwise: named in the warning, not
# accepted silently (a user carrying a config over should see what it maps to).
_OTHER_TOOLS_KEYS = {"micro_batch_size": "per_device_train_batch_size", "num_epochs": "num_train_epochs",
                     "sequence_len": "cutoff_len", "max_seq_length": "cutoff_len", "val_set_size": "val_size",
                     "lora_r": "lora_rank", "lora_target_modules": "lora_target", "base_model": "model_name_or_path"}


def closest_key(key: str) -> str | None:
    """The config key a misspelt one most likely meant (``lerning_rate`` -> ``learning_rate``), if any:
    an unknown key is ignored with a warning, so naming the intended key is what makes it fixable.
    (Cutoff 0.8: at 0.7 ``micro_batch_size`` already matched ``micro_batch_by_tokens``.)"""
    if str(key) in _OTHER_TOOLS_KEYS:
        return _OTHER_TOOLS_KEYS[str(key)]
    matches = difflib.get_close_matches(str(key), list(_FIELDS), n=1, cutoff=0.8)
    return matches[0] if matches else None


def _did_you_mean(key: str) -> str:
    guess = closest_key(key)
    return f" (did you mean {guess!r}?)" if guess else ""


def unknown_key_warning(key: str) -> str:
    """The one-line warning for a key sage-ft does not use (CLI, task log)."""
    return f"unknown config key {key!r} ignored{_did_you_mean(key)} (see `sage-ft train --help-config`)"


def _apply_aliases(data: dict[str, Any]) -> list[str]:
    """Map LLaMA-Factory's precision booleans onto ``precision`` and its quantization keys onto ours;
    drop ``stage: sft``. Returns the problems found (another stage or quantization method)."""
    problems: list[str] = []
    for key in _PRECISION_ALIASES:
        if key in data:
            flag = data.pop(key)
            if str(flag).lower() in ("true", "1", "yes"):
                data.setdefault("precision", "fp16" if key == "fp16" else "bf16")
    if "quantization_bit" in data and str(data["quantization_bit"]).strip().lower() in ("", "none", "null", "0"):
        data["quantization_bit"] = "none"  # LLaMA-Factory writes null (or leaves it out) for no quantization
    method = data.pop("quantization_method", "bitsandbytes")
    if str(method).lower() not in ("bitsandbytes", "bnb", "none"):
        problems.append(f"quantization_method: {method!r} is not supported; sage-ft quantizes with bitsandbytes "
                        "(quantization_bit: 4 or 8)")
    stage = data.pop("stage", "sft")
    if stage != "sft":
        problems.append(f"stage: {stage!r} is not supported; sage-ft runs supervised fine-tuning (stage: sft)")
    return problems


def field_type(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field, from its annotation."""
    hints = typing.get_type_hints(TrainConfig)
    hint = hints[name]
    optional = False
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        hint = args[0]
    return hint, optional


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(name: str, value: Any) -> Any:
    """Turn a YAML/CLI/form value into the field's type, or raise ``ValueError`` naming the key."""
    kind, optional = field_type(name)
    if kind is str and not optional and value is not None:
        pass  # a plain string field keeps literal "none" (e.g. report_to: none)
    elif value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        if optional:
            return None
        if kind is str:
            return ""
        raise ValueError(f"{name}: a value is required ({kind.__name__})")
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            text = str(value).strip()
            if text.lstrip("+-").isdigit():
                return int(text)
            number = float(text)  # "8.0" on the command line, as YAML's 8.0 is accepted
            if not number.is_integer():
                raise ValueError
            return int(number)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(str(value).strip()) if isinstance(value, str) else float(value)
            if math.isnan(number):  # every range check passes for NaN: it would fail the run minutes later
                raise ValueError
            return number
        if kind is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            if isinstance(value, dict):
                return ",".join(f"{k}={v}" for k, v in value.items())
            return str(value)
    except (TypeError, ValueError):
        pass
    expected = {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, kind.__name__)
    raise ValueError(f"{name}: {value!r} is not {expected}")


def format_value(value: Any) -> str:
    """The CLI spelling of a value (inverse of ``coerce``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` from ``--set`` into a dict (values are coerced later by type).

    A key the user typed on the command line must be one sage-ft knows: a mistyped ``--set
    learning_rat=1e-3`` is an error naming the key it likely meant (a warning let the run train with
    the default). Unknown keys inside a YAML file stay warnings: LLaMA-Factory files carry keys of
    their own. Every malformed item and unknown key is reported at once.
    """
    out, problems = _read_overrides(items)
    if problems:
        raise ConfigError(problems)
    return out


# Keys a --set may name besides the fields: the LLaMA-Factory spellings ``_apply_aliases`` maps.
_OVERRIDE_ALIASES = frozenset({*_PRECISION_ALIASES, "stage", "quantization_method"})


def _read_overrides(items: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``parse_overrides``' dict of the well-formed, known items, and the problems of the others."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set learning_rate=1e-4")
        elif key not in _FIELDS and key not in _IGNORED_KEYS and key not in _OVERRIDE_ALIASES:
            problems.append(f"--set {key}: unknown config key{_did_you_mean(key)}; "
                            "see `sage-ft train --help-config` for every key")
        else:
            out[key] = value
    return out, problems


def gpu_ids(devices: str) -> list[int] | None:
    """The GPU ids ``devices`` names ('0,1' -> [0, 1]; [] for 'auto' and 'cpu'), None when it is none of those."""
    value = devices.strip().lower().replace(" ", "")
    if value in ("auto", "cpu", ""):
        return []
    parts = value.split(",")
    return [int(part) for part in parts] if all(part.isdigit() for part in parts) else None


def devices_problem(devices: str) -> str:
    """What is wrong with a ``devices`` value that ``gpu_ids`` refuses."""
    return f"devices: {devices!r}; use 'auto', 'cpu' or GPU ids like '0,1'"


def describe_fields() -> str:
    """Human-readable list of every key with its default and help (``sage-ft train --help-config``)."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        ui: UI = f.metadata["ui"]
        extra = f" [choices: {', '.join(map(str, ui.choices))}]" if ui.choices else ""
        lines.append(f"{f.name} (default {format_value(f.default)}){extra}\n    {ui.help}")
    return "\n".join(lines)
