"""The heavy half of ``FineTuneRun``: model, LoRA, data pipeline and transformers' ``Trainer``.

Imported only inside ``FineTuneRun.run()`` so that ``import sage_ft.training`` stays light.
Choices that make the default path fast (see ``collate`` for the batching reasoning):

- length-grouped batches + per-batch packing where it is cheaper (``collate``), so almost no
  computed token is padding;
- ``precision: auto`` = bf16 autocast where the hardware has bf16 matmuls (GPUs with bf16, CPUs with
  AVX512-BF16/AMX), else fp32. LoRA weights stay fp32 (peft upcasts adapters), so the small
  trainable update is accumulated exactly while the big matmuls run at bf16 speed. On CPU the base
  weights stay fp32 (autocast casts per matmul; RAM is not the limit for CPU-sized models); on GPU
  they are loaded in bf16/fp16 to halve memory and skip the per-step casts;
- no per-step host work beyond a flag check: loss/grad-norm are read at logging steps only, and
  tokens are counted on the host from the collator's count (transformers' own counter reads a
  device tensor back every micro-step, which makes the CPU wait for the GPU to drain);
- on GPUs: liger-kernel's fused linear cross-entropy where installed (``sage_ft.gpu``; the logits,
  tokens x vocab, are never materialised, so bigger batches fit) and the fused AdamW kernel.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from sage_ft.config import TrainConfig
from sage_ft.data.tokenize import (
    has_trainable_token,
    token_length_stats,
    tokenize_conversations,
)
from sage_ft.estimate import quantization_problem
from sage_ft.events import Preparation
from sage_ft.training.callbacks import build_callback
from sage_ft.training.collate import (
    MICRO_BATCHES_KEY,
    REAL_TOKENS_KEY,
    LengthGroupedSampler,
    PackingCollator,
    cost_model,
)
from sage_ft.training.run import CancelledBeforeTraining, FineTuneRun, RunFailure

log = logging.getLogger("sage_ft.training")


def train(run: FineTuneRun) -> tuple[str, dict[str, Any]]:
    """Run ``run.config`` to completion, cancellation or an exception; returns (status, metrics)."""
    from sage_ft.models.resolve import resolve_model
    from sage_ft.training.inputs import load_run_dataset, load_run_eval_dataset

    config, out, meta = run.config, run.output_dir, run._meta
    prep = Preparing(run)
    prep.phase("data")
    report = load_run_dataset(config)  # bad data fails before any model is loaded
    eval_report = load_run_eval_dataset(config)
    meta["dataset_info"] = {"files": [str(f) for f in report.files], "format": report.format,
                            "rows_total": report.rows_total, "rows_ok": report.rows_ok,
                            "rows_used": len(report.conversations), "rows_dropped": len(report.dropped)}
    if eval_report:
        meta["dataset_info"].update(eval_files=[str(f) for f in eval_report.files], eval_rows_ok=eval_report.rows_ok)
    model_dir = resolve_model(config.model_name_or_path)
    meta["base_model_path"] = str(model_dir)
    tokenizer = load_tokenizer(model_dir, config.template)
    prep.phase("tokenize", done=0, total=len(report.conversations))
    samples = tokenize_conversations(report.conversations, tokenizer, config.cutoff_len, config.template,
                                     progress=prep.tokenized)
    del report  # the conversations as text (often more memory than their tokens) are not needed any more
    if not samples:
        raise RunFailure(f"no sample keeps an assistant token within cutoff_len {config.cutoff_len}; "
                         "raise cutoff_len or shorten the prompts")
    if eval_report:
        train_set, eval_set = list(samples), list(tokenize_conversations(
            eval_report.conversations, tokenizer, config.cutoff_len, config.template))
        del eval_report
        if not eval_set:
            raise RunFailure(f"eval_dataset: no sample keeps an assistant token within cutoff_len {config.cutoff_len}; "
                             "raise cutoff_len or shorten its prompts")
    else:
        train_set, eval_set = split_eval(list(samples), config)
    meta["dataset_info"].update(samples_train=len(train_set), samples_eval=len(eval_set),
                                samples_truncated=samples.truncated, samples_no_labels=samples.dropped,
                                token_stats=token_length_stats(train_set, config.cutoff_len))
    device, precision = resolve_device_and_precision(config)
    meta.update(device=device, precision=precision)
    data_line = (f"data: {len(train_set):,} train / {len(eval_set):,} eval samples ({samples.truncated:,} truncated, "
                 f"{samples.dropped:,} without labels dropped); device {device}, precision {precision}")
    log.info("%s", data_line)
    run.emitter.emit("log", level="info", source="data", message=data_line)  # the CLI shows it too

    model = trainer = None
    try:
        prep.phase("model")
        model = load_model(model_dir, precision, device, config)
        if config.quantization_bits:
            meta["quantization"] = {"bits": config.quantization_bits, "type": config.quantization_type,
                                    "double_quantization": config.double_quantization}
        packing = config.packing and supports_packing(model, train_set)
        if config.packing and not packing:
            log.warning("packing is off: this model does not give the same loss with position-id packing; "
                        "using length-grouped padded batches")
        seed_everything(config.seed)  # the adapter's random init: the Trainer seeds only after this
        model = apply_lora(model, config)
        if precision in ("bf16", "fp16"):
            skip_redundant_input_casts(model)
        if config.torch_compile:
            meta["torch_compile_layers"] = compile_decoder_layers(model)
            run.emitter.emit("log", level="info", source="torch_compile", message=(
                f"torch_compile: {meta['torch_compile_layers']} decoder layers are compiled during the first "
                "step (about a minute; a cancel takes effect after it)"))
        meta["lora"]["trainable_params"], meta["lora"]["total_params"] = count_params(model)
        linear_cost, attention_cost = cost_model(model.config)
        collator = PackingCollator(
            pad_token_id=tokenizer.pad_token_id, max_row_len=config.cutoff_len, packing=packing,
            linear_cost_per_token=linear_cost, attention_cost_per_pair=attention_cost,
            attention_is_per_sample=getattr(model.config, "_attn_implementation", "") in (
                "flash_attention_2", "flash_attention_3"),
            token_budget=micro_batch_token_budget(config, train_set + eval_set, device))
        trainer_ref: dict[str, Any] = {}
        callback = build_callback(run.emitter, run._state, run._control, collator, trainer_ref, {
            "config": config.to_dict(), "output_dir": str(out), "base_model_path": str(model_dir),
            "samples_train": len(train_set), "samples_eval": len(eval_set), "packing": packing,
            "precision": precision, "device": device})
        trainer = make_trainer(model, tokenizer, config, out, precision, device, train_set, eval_set,
                               collator, callback)
        trainer_ref["trainer"] = trainer
        meta["fused_cross_entropy"] = bool(trainer.args.use_liger_kernel)
        checkpoint = find_resume_checkpoint(config, out)
        if checkpoint:
            step = json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
            meta["resumed_from"] = str(checkpoint)
            run.emitter.emit("checkpoint_loaded", step=step, path=str(checkpoint))
            log.info("resuming from %s (step %d)", checkpoint, step)
        if run.is_main_process:
            remove_stale_staging(out)
        prep.stop_if_cancelled()
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        status = "cancelled" if run._control.cancelled else "completed"
        metrics = final_metrics(trainer, result, collator, paused_s=run._control.paused_seconds)
        meta["padding_fraction"] = metrics.get("padding_fraction")
        if run.is_main_process:  # the other ranks hold the same weights (DDP) and write nothing
            save_adapter(model, tokenizer, out / "lora")
            if status == "completed" and config.merge_lora and config.quantization_bits:
                del trainer, model  # the adapter is merged into the full-precision base, loaded anew
                trainer = model = None
                gc.collect()
                merge_saved_adapter(out / "lora", model_dir, out / "merged_model")
            elif status == "completed" and config.merge_lora:
                merge_into(model, tokenizer, out / "merged_model")
                model = None  # merged in place: the peft wrapper is gone
        return status, metrics
    finally:
        del trainer, model
        if config.torch_compile:
            _forget_compiled_code()
        gc.collect()
        _empty_device_cache()


# ---------------------------------------------------------------------- pieces


class Preparing:
    """What a run does before its first step (read the data, tokenise it, load the model), told as
    ``preparing`` events, so the task list says "tokenizing 34,000/100,000" rather than "step 0/?"
    for the minute a large dataset or model takes; and a cancel there ends the run at once
    (``CancelledBeforeTraining``) instead of after a first step. Not in a data-parallel run: one rank
    leaving early would leave the others waiting in the trainer's first all-reduce, so there every
    rank stops together after the first step, as before."""

    REPORT_EVERY_S = 1.0

    def __init__(self, run: FineTuneRun):
        self.run = run
        self.can_stop_early = int(os.environ.get("WORLD_SIZE", "1") or 1) < 2
        self._last_report = 0.0

    def phase(self, name: str, **progress: int) -> None:
        self.stop_if_cancelled()
        log.info("%s", Preparation(name, **progress).text)
        self.run.emitter.emit("preparing", phase=name, **progress)
        self._last_report = time.monotonic()

    def tokenized(self, done: int, total: int) -> None:
        """``tokenize_conversations``' progress callback."""
        self.stop_if_cancelled()
        if time.monotonic() - self._last_report >= self.REPORT_EVERY_S or done == total:
            self.run.emitter.emit("preparing", phase="tokenize", done=done, total=total)
            self._last_report = time.monotonic()

    def stop_if_cancelled(self) -> None:
        if self.can_stop_early and self.run.cancel_requested:
            raise CancelledBeforeTraining()


def load_tokenizer(model_dir: Path, template: str):
    from transformers import AutoTokenizer

    from sage_ft.data.templates import chat_template_for

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token_id is None:
        raise RunFailure(f"the tokenizer of {model_dir} has no pad, eos or unk token to pad batches with")
    try:
        # Saved with the adapter so that serving renders prompts exactly as in training.
        tokenizer.chat_template = chat_template_for(template, tokenizer)
    except ValueError as exc:
        raise RunFailure(f"template: {exc}") from None
    return tokenizer


def split_eval(samples: list[dict], config: TrainConfig) -> tuple[list[dict], list[dict]]:
    """Hold out ``config.held_out`` samples for the eval loss, chosen with ``config.seed``."""
    n_eval = config.held_out(len(samples))
    if not n_eval:
        return samples, []
    if n_eval >= len(samples):
        raise RunFailure(f"val_size {config.val_size:g} leaves no training sample out of {len(samples)}; "
                         "lower val_size")
    order = list(range(len(samples)))
    random.Random(config.seed).shuffle(order)
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


def resolve_device_and_precision(config: TrainConfig) -> tuple[str, str]:
    """('cuda'|'cpu', 'bf16'|'fp16'|'fp32') from ``devices`` and ``precision`` (see module docstring)."""
    import torch

    if config.devices not in ("auto", "cpu") and not torch.cuda.is_initialized():
        os.environ["CUDA_VISIBLE_DEVICES"] = config.devices
    if config.num_processes > 1:
        log.warning("num_processes %d: an in-process run uses one process; launch with `accelerate launch` "
                    "for data-parallel training", config.num_processes)
    device = "cuda" if config.devices != "cpu" and torch.cuda.is_available() else "cpu"
    if config.devices not in ("auto", "cpu") and device == "cpu":
        raise RunFailure(f"devices: {config.devices!r} asks for GPUs but none is available; use 'auto' or 'cpu'")
    precision = config.precision
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and device == "cpu":
        raise RunFailure("precision: fp16 needs a GPU; use bf16 (CPUs with AVX512-BF16) or fp32 on CPU")
    return device, precision


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX); emulated bf16 would be slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def half_dtype(precision: str):
    """torch's dtype for a half precision ("bf16"/"fp16"), None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def load_dtype(precision: str, device: str):
    """The dtype weights are loaded in: half precision on GPUs; fp32 on CPU (bf16 runs use autocast there)."""
    import torch

    half = half_dtype(precision)
    return half if half is not None and device == "cuda" else torch.float32


def load_model(model_dir: Path, precision: str, device: str, config: TrainConfig | None = None):
    """The base model to train on, quantized on load where ``config.quantization_bit`` asks (QLoRA)."""
    from transformers import AutoModelForCausalLM

    dtype = load_dtype(precision, device)
    quantized = quantization_config(config, dtype, device) if config is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **quantized)
    except OSError as exc:
        raise RunFailure(f"could not load the model from {model_dir}: {exc}") from None
    model.config.use_cache = False  # no KV cache in training (and it would disable packed masks)
    return model


def quantization_config(config: TrainConfig, dtype: Any, device: str) -> dict[str, Any]:
    """``from_pretrained``'s arguments that load the base quantized by bitsandbytes (none without
    ``quantization_bit``). The decoder's linear layers are stored in 4 or 8 bits and dequantized per
    matmul to ``dtype``, the compute dtype of the unquantized rest; embeddings, norms and the output
    head stay in ``dtype``. Placed on its device at load (bitsandbytes quantizes as weights arrive),
    the Trainer does not move it: on a GPU, this process's (``LOCAL_RANK`` in a data-parallel run)."""
    if not config.quantization_bits:
        return {}
    problem = quantization_problem(config)
    if problem:
        raise RunFailure(problem)
    from transformers import BitsAndBytesConfig

    if config.quantization_bits == 4:
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=config.quantization_type,
                                 bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=config.double_quantization)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    place = {"": int(os.environ.get("LOCAL_RANK", "0") or 0)} if device == "cuda" else {"": "cpu"}
    return {"quantization_config": bnb, "device_map": place}


def supports_packing(model: Any, samples: list[dict]) -> bool:
    """Whether position-id packing gives the same loss as padding for this model (checked for real).

    A forward pass on three short samples, padded vs packed: cheap, and it catches models whose
    attention ignores position_ids-derived masks (they would silently attend across samples).
    """
    import inspect

    import torch

    if "position_ids" not in inspect.signature(model.forward).parameters:
        return False
    probe = [{"input_ids": s["input_ids"][:24], "labels": s["labels"][:24]} for s in samples[:3]]
    probe = [p for p in probe if has_trainable_token(p["labels"][1:])]
    if len(probe) < 2:
        return True  # nothing to compare; the model accepts position_ids
    collator = PackingCollator(pad_token_id=0, max_row_len=10_000)
    padded = collator._padded(probe)
    packed = collator._packed(probe, [list(range(len(probe)))])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            device = next(model.parameters()).device
            a = model(**{k: v.to(device) for k, v in padded.items()}).loss.float().item()
            b = model(**{k: v.to(device) for k, v in packed.items()}).loss.float().item()
    except Exception as exc:  # a model that rejects packed inputs: use padding
        log.info("packing probe failed: %s", exc)
        return False
    finally:
        model.train(was_training)
    tolerance = 1e-3 if next(model.parameters()).dtype == torch.float32 else 3e-2
    return math.isfinite(a) and abs(a - b) <= tolerance * max(1.0, abs(a))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so that a run is reproducible from its config.

    peft draws the LoRA A matrices from torch's global generator when it wraps the model, before
    the Trainer seeds anything, and that generator starts from a different seed in every process
    (torch 2.13: ``torch.initial_seed()`` differs run to run). Without this, two runs of the same
    config trained different adapters; equal losses at step 0 (B starts at zero) hid it.
    """
    from transformers import set_seed

    set_seed(seed)


def lora_target_modules(model: Any, targets: str | list[str]) -> str | list[str]:
    """peft's ``target_modules``; a name that matches no linear layer is an error listing the names."""
    if targets == "all-linear":
        return targets
    linear = [name for name, module in model.named_modules()
              if type(module).__name__ in ("Linear", "Conv1D", "Linear8bitLt", "Linear4bit")]
    available = sorted({n.rsplit(".", 1)[-1] for n in linear} - {"lm_head"})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise RunFailure(f"lora_target: {', '.join(missing)} matches no linear module of this model; "
                         f"available: {', '.join(available)} (or 'all')")
    return targets


def apply_lora(model: Any, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.effective_lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=lora_target_modules(model, config.lora_targets), use_rslora=config.use_rslora,
                      use_dora=config.use_dora, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def skip_redundant_input_casts(model: Any) -> None:
    """Stop peft casting each LoRA layer's input to the adapter's fp32 before the matmul.

    Under autocast the matmul casts it straight back to bf16/fp16, so every adapted linear paid two
    activation-sized copies forward and two backward for nothing (in an H100 profile of a
    Qwen2-0.5B-shaped run, copies were 18% of the GPU time). The same numbers without them.
    Only valid under autocast: ``engine`` calls it for bf16/fp16 runs, which always train with it.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def compile_decoder_layers(model: Any) -> int:
    """Regional ``torch.compile``: each decoder layer compiled (forward and backward), returns how many.

    Why: on a GPU, a LoRA step of a small model is bound by the host launching kernels, not by the
    GPU (an H100 profile of a Qwen2-0.5B-shaped run: ~5,000 small ops per micro-step, 280 ms of CPU
    for 130 ms of GPU work); inductor fuses the norms, rotary, activation and LoRA elementwise ops of
    a layer into a few kernels. All layers run the same code, so one compilation serves them all
    (compiling the whole model took 210 s instead of 22 s for about the same per-step gain on the
    CPU proxy of that regime, ``bench/host_overhead.py``; docs/benchmarks.md).
    ``dynamic=True``: packed rows change length every step, and a first static compilation would
    only be thrown away at the second step. Off by default: on CPU it gained only 4-9% per step
    after 15-30 s of compiling (``bench/host_overhead.py --compute-bound``), and its GPU gain is
    not measured yet.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        raise RunFailure(f"torch_compile: {type(model.get_base_model()).__name__} has no decoder layers sage-ft "
                         "knows how to compile; turn torch_compile off")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def _forget_compiled_code() -> None:
    """Drop dynamo's caches: they are keyed on code shared by every run in this process, and a later
    run's layers would add entries until the recompile limit silently falls back to eager."""
    import torch

    torch._dynamo.reset()


def count_params(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def micro_batch_token_budget(config: TrainConfig, samples: list[dict], device: str) -> int:
    """Computed tokens per micro-batch with ``micro_batch_by_tokens``, else 0 (sample-count micro-batches).

    batch x the longest sample: the largest micro-batch the sample-count scheme can already produce
    (length-grouped batches put the longest samples together), which the memory estimate and the
    recommendation are sized for, so splitting by this budget never needs more memory. ``auto`` is
    on for GPUs only: there a small model's pass costs mostly host time launching kernels, so fewer
    passes is faster; on a CPU the pass count hardly matters and a step's samples, grouped 8 where
    they were grouped 4, pad a little more (median 3% slower at batch 4 x 2, docs/benchmarks.md).
    """
    mode = config.micro_batch_by_tokens
    if mode == "off" or (mode == "auto" and device != "cuda"):
        return 0
    if config.gradient_accumulation_steps <= 1 or not samples:
        return 0
    return config.per_device_train_batch_size * max(len(s["input_ids"]) for s in samples)


def make_trainer(model, tokenizer, config: TrainConfig, out: Path, precision: str, device: str,
                 train_set: list[dict], eval_set: list[dict], collator: PackingCollator, callback):
    """transformers' Trainer with sage-ft's sampler, collator, token counting and checkpoints.

    With a token budget the Trainer sees one batch of batch x accumulation samples per optimizer
    step (accumulation 1) and ``training_step`` runs forward/backward over the micro-batches the
    collator cut from it.
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from sage_ft.gpu import fused_cross_entropy_available

    eval_steps = config.eval_steps or config.save_steps
    fused_loss = fused_cross_entropy_available(getattr(model.config, "model_type", ""), device)
    # Same update as adamw_torch, in one kernel launch instead of a few per parameter group.
    optim = "adamw_torch_fused" if device == "cuda" and config.optim == "adamw_torch" else config.optim
    if fused_loss:
        log.info("fused linear cross-entropy (liger-kernel): the logits are not materialised")
    samples_per_step, accumulation = config.per_device_train_batch_size, config.gradient_accumulation_steps
    if collator.token_budget:
        samples_per_step, accumulation = samples_per_step * accumulation, 1
        log.info("micro-batches by token budget: %d samples per step in micro-batches of at most %d tokens",
                 samples_per_step, collator.token_budget)
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=samples_per_step,
        per_device_eval_batch_size=config.per_device_train_batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=config.learning_rate, num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_steps if config.warmup_steps > 0 else min(config.warmup_ratio, 0.999),
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, optim=optim,
        use_liger_kernel=fused_loss,
        seed=config.seed, data_seed=config.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=device == "cpu",
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        logging_strategy="steps", logging_steps=config.logging_steps, logging_nan_inf_filter=False,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        eval_strategy="steps" if eval_set else "no", eval_steps=eval_steps if eval_set else None,
        report_to=[] if config.report_to == "none" else [config.report_to],
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_pin_memory=device == "cuda",
        include_num_input_tokens_seen="non_padding", disable_tqdm=True, log_level="warning",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; the search costs a pass
    )
    lengths = [len(s["input_ids"]) for s in train_set]

    class SageTrainer(Trainer):
        """Length-grouped training order (``collate.LengthGroupedSampler``) and atomic checkpoints.

        A checkpoint is written to ``checkpoint-N.tmp/`` and renamed to ``checkpoint-N`` only when
        every file is complete, so a crash or a full disk mid-save leaves the previous checkpoint
        as the last one, and nothing half-written ever looks resumable.
        """

        _staging_root: str | None = None
        micro_batches = 0  # forward/backward passes of this train() call (for micro_batches_per_step)

        def _get_train_sampler(self, train_dataset=None):
            return LengthGroupedSampler(lengths, self.args.train_batch_size, config.seed)

        def training_step(self, model, inputs, num_items_in_batch=None):
            chunks = inputs.get(MICRO_BATCHES_KEY)
            if chunks is None:
                self.micro_batches += 1
                return super().training_step(model, inputs, num_items_in_batch)
            # The loss of every micro-batch is divided by the label tokens of the whole step, as
            # with gradient accumulation; gradients sync (DDP) on the last micro-batch only.
            num_items = self._get_num_items_in_batch(chunks, self.args.device)
            self.current_gradient_accumulation_steps = len(chunks)  # used only when num_items is None
            total = None
            for i, chunk in enumerate(chunks):
                sync = contextlib.nullcontext() if i == len(chunks) - 1 else self.accelerator.no_sync(model)
                with sync:
                    loss = super().training_step(model, chunk, num_items)
                total = loss if total is None else total + loss
            self.micro_batches += len(chunks)
            return total

        def floating_point_ops(self, inputs):
            chunks = inputs.get(MICRO_BATCHES_KEY)
            if chunks is None:
                return super().floating_point_ops(inputs)
            return sum(super(SageTrainer, self).floating_point_ops(chunk) for chunk in chunks)

        def compute_loss(self, model, inputs, *args, **kwargs):
            inputs = {k: v for k, v in inputs.items() if k != REAL_TOKENS_KEY}
            return super().compute_loss(model, inputs, *args, **kwargs)

        def _track_num_input_tokens(self, inputs):
            if REAL_TOKENS_KEY not in inputs:
                return super()._track_num_input_tokens(inputs)
            tokens = int(inputs[REAL_TOKENS_KEY])
            if self.args.world_size > 1:  # one gather per optimizer step on every rank
                import torch

                tokens = int(self.accelerator.gather(torch.tensor(tokens, device=self.args.device)).sum().item())
            self.state.num_input_tokens_seen += tokens

        def _get_output_dir(self, trial):
            return self._staging_root or super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            staging = run_dir / f"{name}{STAGING_SUFFIX}"
            self._staging_root = str(staging)
            try:
                super()._save_checkpoint(model, trial)  # -> <staging>/checkpoint-N (rotation sees only it)
                _barrier()  # every rank has written its RNG state before rank 0 publishes the folder
                if self.args.should_save:
                    publish_checkpoint(staging / name, run_dir / name)
                    from transformers.trainer_utils import rotate_checkpoints

                    rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                                       best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
            except Exception as exc:
                shutil.rmtree(staging, ignore_errors=True)  # frees the space a full disk needs back
                raise CheckpointSaveError(describe_save_failure(exc, name, run_dir)) from exc
            finally:
                self._staging_root = None

    trainer = SageTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
                          data_collator=collator, processing_class=tokenizer, callbacks=[callback])
    trainer.remove_callback(PrinterCallback)  # progress goes through our events and logs.txt instead
    return trainer


STAGING_SUFFIX = ".tmp"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the message names it and the cause (disk full, ...)."""


def describe_save_failure(exc: BaseException, name: str, run_dir: Path) -> str:
    """'disk full / file too large while saving checkpoint-N' and what to do, from any save error.

    torch.save reports a failed write as a RuntimeError ("file write failed"), so the errno is
    looked for along the exception chain and in the text.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    codes = {getattr(e, "errno", None) for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    previous = "the previous checkpoint is kept"
    if errno.EFBIG in codes or "file too large" in text:
        return (f"file too large while saving {name} in {run_dir}: the file size limit (ulimit -f) was reached; "
                f"raise the limit or save to another output_dir ({previous})")
    if codes & {errno.ENOSPC, errno.EDQUOT} or "no space left" in text or "quota" in text \
            or "file write failed" in text:
        return (f"disk full while saving {name} in {run_dir}; free space there or choose another output_dir "
                f"({previous})")
    return f"could not save {name} in {run_dir}: {type(exc).__name__}: {exc} ({previous})"


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Make a fully written checkpoint visible under its final name in one rename (after fsync)."""
    for file in staged.rglob("*"):
        if file.is_file():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():  # a stale folder of a run resumed from an earlier step
        shutil.rmtree(final)
    staged.rename(final)
    shutil.rmtree(staged.parent, ignore_errors=True)
    _fsync_dir(final.parent)


def remove_stale_staging(out: Path) -> None:
    """Half-written ``checkpoint-N.tmp`` folders left by a crash are never resumed from: delete them."""
    for stale in out.glob(f"checkpoint-*{STAGING_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoints whose save finished (trainer_state.json, written last, parses), oldest first."""
    found = []
    for path in out.glob("checkpoint-*"):
        if not path.name.split("-")[-1].isdigit():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append(path)
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def find_resume_checkpoint(config: TrainConfig, out: Path) -> Path | None:
    wanted = config.resume_from_checkpoint
    if not wanted:
        return None
    if wanted == "last":
        found = complete_checkpoints(out)
        if not found:
            log.warning("resume_from_checkpoint: last, but %s has no complete checkpoint; starting from step 0", out)
            return None
        return found[-1]
    path = Path(wanted).expanduser().resolve()
    if path not in complete_checkpoints(path.parent):
        raise RunFailure(f"resume_from_checkpoint: {path} is not a complete checkpoint (no readable "
                         "trainer_state.json); use 'last' or another checkpoint-N folder")
    return path


def save_adapter(model: Any, tokenizer: Any, target: Path) -> None:
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    log.info("adapter saved: %s", target)


def merge_into(model: Any, tokenizer: Any, target: Path) -> None:
    merged = model.merge_and_unload()
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))
    log.info("merged model saved: %s", target)


def merge_saved_adapter(adapter_dir: Path, model_dir: Path, target: Path) -> None:
    """``merge_lora`` for a run on a quantized base: merging into 4/8-bit weights would round the
    merged model to them, so the saved adapter goes into the base loaded at full precision (as the
    served model answers: vLLM applies the adapter to the unquantized base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto")
    merge_into(PeftModel.from_pretrained(base, str(adapter_dir)), AutoTokenizer.from_pretrained(adapter_dir), target)


def final_metrics(trainer: Any, result: Any, collator: PackingCollator, paused_s: float = 0.0) -> dict[str, Any]:
    """The run's summary; ``paused_s`` (time held by a pause) is left out of its tokens/s."""
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    runtime = max(0.0, float(result.metrics.get("train_runtime") or 0.0) - paused_s)
    tokens = int(trainer.state.num_input_tokens_seen or 0) - int(getattr(trainer, "_initial_num_input_tokens_seen", 0))
    steps = trainer.state.global_step - int(getattr(trainer, "_initial_global_step", 0))
    metrics = {
        "global_step": trainer.state.global_step,
        "total_steps": trainer.state.max_steps,
        "epoch": trainer.state.epoch,
        "train_loss": result.metrics.get("train_loss"),
        "final_loss": losses[-1] if losses else None,
        "first_loss": losses[0] if losses else None,
        "eval_loss": evals[-1] if evals else None,
        "train_runtime": runtime,  # without pauses
        "paused_seconds": round(paused_s, 3),
        "tokens_seen": int(trainer.state.num_input_tokens_seen or 0),
        "tokens_per_second": tokens / runtime if runtime > 0 else None,
        "padding_fraction": round(collator.padding_fraction, 4),
        "micro_batches_per_step": round(trainer.micro_batches / steps, 3) if steps else None,
        "packed_batches": collator.stats["packed_batches"],
        "padded_batches": collator.stats["padded_batches"],
    }
    return metrics


def _empty_device_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # cleanup only
        pass
