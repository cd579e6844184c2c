"""What autograd keeps per token and decoder layer, counted, against the memory estimator's term.

The estimator (``sage_ft.estimate.activation_bytes_per_token_layer``) models the activations a LoRA
run keeps for the backward pass. This counts them: a forward pass under
``torch.autograd.graph.saved_tensors_hooks`` records every tensor autograd saves (each storage once,
parameters left out), with 1 and 3 decoder layers and with R and 2R rows, so that what one token
costs in one layer separates from what a layer keeps whatever the tokens (autocast's weight copies,
``sage_ft.estimate.autocast_weight_copy_bytes``) and from the per-token rest outside the layers
(embedding, final norm, loss). The model is built from a config with random weights in the
trainer's layout (``sage_ft.training.engine``: fp32 weights with bf16 autocast on CPU,
half-precision weights on a GPU), LoRA applied by the engine, and fed packed rows made by sage-ft's
collator (three samples a row, so attention gets its block-diagonal mask).

Why: on an H100 the memory estimate of an fp32 run was a quarter to a third under the measured peak
and bf16's 8-13% over (docs/memory_estimator.md). On CPU this count and the estimator agree to the
byte, in fp32 and bf16; run on CUDA (``--device cuda --shape qwen2-0.5b --seq 1024``) it shows
whether the GPU gap is in what the layers save (the attention kernel SDPA picks, say) or elsewhere.
Not a timing, so no baseline: the ratio is estimated / counted.

    python bench/saved_activations.py [--device cuda] [--shape qwen2-0.5b | --model DIR] [--rows R] [--seq S]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import QWEN2_05B_SHAPE, print_table, save_results  # noqa: E402

# A small Qwen2 (the layout of the GPU bench's model): 4 query heads of 64, 2 KV heads, widths all
# different so that a saved tensor's last dimension says what it is.
SMALL_QWEN2 = {"model_type": "qwen2", "hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 512, "tie_word_embeddings": True}
SHAPES = {"small": SMALL_QWEN2, "qwen2-0.5b": {"model_type": "qwen2", **QWEN2_05B_SHAPE}}
LAYER_COUNTS = (1, 3)


def build(structure: dict[str, Any], layers: int, precision: str, device: str, config: Any) -> Any:
    """A random model of ``structure`` with ``layers`` decoder layers, as the trainer would hold it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sage_ft.gpu import fused_cross_entropy_available
    from sage_ft.training import engine

    engine.seed_everything(0)
    shape = {k: v for k, v in structure.items() if k != "model_type"}
    model_config = AutoConfig.for_model(structure["model_type"], **{**shape, "num_hidden_layers": layers,
                                                                    "use_cache": False})
    model = AutoModelForCausalLM.from_config(model_config, dtype=engine.load_dtype(precision, device),
                                             attn_implementation="sdpa").to(device)
    model = engine.apply_lora(model, config)
    if engine.half_dtype(precision) is not None:
        engine.skip_redundant_input_casts(model)
    if fused_cross_entropy_available(structure["model_type"], device):
        # as the Trainer does with use_liger_kernel (engine.make_trainer): liger's default kernels,
        # RMSNorm, RoPE and SwiGLU too, which save other tensors than the modules they replace
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, None)
    return model.train()


def batch_of(rows: int, seq: int, vocab: int, packed: bool) -> dict[str, Any]:
    """``rows`` rows of ``seq`` tokens: packed by sage-ft's collator (three samples a row, so attention
    gets a block-diagonal mask), or one sample a row with no mask (what an unpacked batch of one is)."""
    import torch

    from sage_ft.training.collate import PackingCollator

    generator = torch.Generator().manual_seed(0)
    if not packed:
        ids = torch.randint(3, vocab, (rows, seq), generator=generator)
        return {"input_ids": ids, "labels": ids.clone()}
    lengths = [seq // 4, seq // 2, seq - seq // 4 - seq // 2]
    samples = []
    for _ in range(rows):
        for n in lengths:
            ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
            samples.append({"input_ids": ids, "labels": ids})
    layout = [[3 * r, 3 * r + 1, 3 * r + 2] for r in range(rows)]
    return PackingCollator(pad_token_id=0, max_row_len=seq)._packed(samples, layout)


def forward_loss(model: Any, batch: dict[str, Any], precision: str, device: str) -> Any:
    """The loss of one forward pass, under autocast for half precision (as the Trainer runs it)."""
    import torch

    from sage_ft.training.engine import half_dtype

    half = half_dtype(precision)
    inputs = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device_type=device, dtype=half or torch.bfloat16, enabled=half is not None):
        return model(**inputs).loss


def saved_bytes(model: Any, batch: dict[str, Any], precision: str, device: str) -> tuple[int, Counter]:
    """Bytes of the tensors autograd saves in one forward pass, and the same split by (last dim, dtype)."""
    import torch

    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, tuple[int, str]]] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kind = (tensor.shape[-1] if tensor.dim() else 0, str(tensor.dtype).removeprefix("torch."))
            storages[storage.data_ptr()] = (storage.nbytes(), kind)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        forward_loss(model, batch, precision, device)  # counted as saved; the graph is dropped at once
    by_kind: Counter = Counter()
    for size, kind in storages.values():
        by_kind[kind] += size
    return sum(by_kind.values()), by_kind


def peak_bytes(model: Any, batch: dict[str, Any], precision: str, device: str) -> int:
    """Peak bytes allocated during one forward and backward pass, beyond what existed before it.

    From the profiler's memory timeline (every allocation and free, in order; works on CPU, where
    there are no allocator statistics), so unlike RSS it does not depend on what ran before."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        forward_loss(model, batch, precision, device).backward()
    model.zero_grad(set_to_none=True)
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action.name == "CREATE":
            current += size
        elif action.name == "DESTROY":
            current -= size
        peak = max(peak, current)
    return peak


def measure(structure: dict[str, Any], config: Any, precision: str, device: str, rows: int,
            seq: int) -> dict[str, Any]:
    """Saved bytes per token and layer (and per token outside the layers), measured and estimated.

    Packed rows when ``config.packing``; otherwise unmasked rows, which the estimate expects only of
    an unpacked batch of one (give such a config ``per_device_train_batch_size=1``)."""
    from sage_ft.estimate import (
        activation_bytes_per_token_layer,
        autocast_weight_copy_bytes,
        facts_from_config,
    )

    totals, kinds = {}, {}
    for layers in LAYER_COUNTS:
        model = build(structure, layers, precision, device, config)
        for n_rows in (rows, 2 * rows):
            totals[layers, n_rows], kinds[layers, n_rows] = saved_bytes(
                model, batch_of(n_rows, seq, structure["vocab_size"], config.packing), precision, device)
        del model
    tokens, extra_layers = rows * seq, LAYER_COUNTS[1] - LAYER_COUNTS[0]
    low, high = LAYER_COUNTS

    def per_token_layer(table: dict) -> float:
        return ((table[high, 2 * rows] - table[low, 2 * rows]) - (table[high, rows] - table[low, rows])) \
            / extra_layers / tokens

    measured = per_token_layer(totals)
    split = {f"{dim} x {dtype}": per_token_layer({k: v[(dim, dtype)] for k, v in kinds.items()})
             for dim, dtype in sorted(set().union(*kinds.values()), key=str)}
    facts = facts_from_config({**structure, "num_hidden_layers": high})
    estimated = activation_bytes_per_token_layer(facts, config, precision, device, seq)
    return {"precision": precision, "device": device, "rows": rows, "seq": seq,
            "measured_per_token_layer": measured, "estimated_per_token_layer": estimated,
            "ratio": estimated / measured,
            # what a layer saves whatever the tokens: autocast's half-precision weight copies
            "measured_per_layer": (totals[high, rows] - totals[low, rows]) / extra_layers - tokens * measured,
            "estimated_per_layer": sum(autocast_weight_copy_bytes(facts, config, precision, device)) / high,
            "per_token_outside_layers": (totals[low, 2 * rows] - totals[low, rows]) / tokens - low * measured,
            "by_last_dim_and_dtype": {k: v for k, v in split.items() if abs(v) >= 1}}


# what exists before a training pass (or only after it: the optimizer's states), not its peak
_STANDING = ("weights", "lora_params", "optimizer_states", "overhead")


def measure_peak(structure: dict[str, Any], config: Any, precision: str, device: str, layers: int = 3) -> dict[str, Any]:
    """Peak bytes of one forward and backward pass (``config``'s batch, cutoff_len tokens a row), counted
    and estimated: the estimate's terms other than the standing ones (weights, adapters, optimizer)."""
    from sage_ft.estimate import estimate_memory, facts_from_config

    model = build(structure, layers, precision, device, config)
    if config.gradient_checkpointing:  # as the Trainer turns it on (sage_ft.training.engine)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = batch_of(config.per_device_train_batch_size, config.cutoff_len, structure["vocab_size"], config.packing)
    measured = peak_bytes(model, batch, precision, device)
    estimate = estimate_memory(dataclasses.replace(config, precision=precision),
                               facts_from_config({**structure, "num_hidden_layers": layers}), device=device, bf16_ok=True)
    estimated = sum(v for k, v in estimate.breakdown.items() if k not in _STANDING)
    return {"precision": precision, "gradient_checkpointing": config.gradient_checkpointing,
            "measured_peak": measured, "estimated_peak": estimated, "peak_ratio": estimated / measured,
            "estimated_terms": {k: v for k, v in estimate.breakdown.items() if k not in _STANDING}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES),
                        help="built-in model shape (qwen2-0.5b: the GPU bench's model)")
    parser.add_argument("--model", type=Path, help="a model directory whose config.json gives the shape instead")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128, help="tokens per packed row")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    args = parser.parse_args()

    from sage_ft.config import TrainConfig

    structure = SHAPES[args.shape]
    if args.model:
        cfg = json.loads((args.model / "config.json").read_text(encoding="utf-8"))
        structure = {k: cfg[k] for k in ("model_type", "hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")
                     if k in cfg}
    config, _ = TrainConfig.from_dict({"model_name_or_path": "probe", "dataset": "probe.jsonl", "lora_rank": 8,
                                       "lora_target": "all", "packing": True, "cutoff_len": args.seq,
                                       "per_device_train_batch_size": args.rows})
    rows = [measure(structure, config, precision, args.device, args.rows, args.seq) for precision in args.precision]
    print_table(rows, ["precision", "device", "measured_per_token_layer", "estimated_per_token_layer", "ratio",
                       "measured_per_layer", "estimated_per_layer", "per_token_outside_layers"])
    for row in rows:
        print(f"{row['precision']}: bytes per token and layer by (last dim, dtype): {row['by_last_dim_and_dtype']}")
    peaks = [measure_peak(structure, dataclasses.replace(config, gradient_checkpointing=checkpointing), precision,
                          args.device)
             for precision in args.precision for checkpointing in (False, True)]
    print_table(peaks, ["precision", "gradient_checkpointing", "measured_peak", "estimated_peak", "peak_ratio"])
    save_results(f"saved_activations_{args.device}", {"structure": structure, "rows": rows, "peaks": peaks})


if __name__ == "__main__":
    main()
