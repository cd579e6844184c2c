"""Host work per micro-step in the GPU's launch-bound regime, measured on CPU: eager vs torch_compile.

On an H100, sage-ft's Qwen2-0.5B run was bound by the host, not the GPU (~5,000 small ops per
micro-step: 280 ms of CPU for 130 ms of GPU work; docs/benchmarks.md). That cost comes from the
model's *structure* (24 decoder layers, 7 LoRA-wrapped linears each, norms, rotary, GQA), not its
width, so it can be measured without a GPU: the same structure with tiny widths and a few packed
tokens makes the arithmetic negligible, and what remains is per-op dispatch and Python — the work a
GPU run's host thread does. Both sides are built by sage-ft's own engine (LoRA r8 on all linears,
seeded); ``torch_compile`` side: ``engine.compile_decoder_layers``. Timed forward + backward, one
thread, the two sides alternating in rounds; the first steps (compilation) are reported apart.

This is a proxy: it measures the host work removed, not GPU throughput (autocast casts, which a
bf16 GPU run also pays and inductor also fuses, are absent on this fp32 CPU run).

    python bench/host_overhead.py [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bar_chart, print_table, save_results  # noqa: E402

# Qwen2-0.5B's structure (24 layers, 14:2 query:KV heads, tied embeddings), widths cut to a minimum.
STRUCTURE = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 224,
             "intermediate_size": 64, "vocab_size": 2048, "tie_word_embeddings": True}
SAMPLE_LENGTHS = (9, 6, 12, 8)  # one packed row of 35 tokens
SEED = 0


def build(compiled: bool) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sage_ft.config import TrainConfig
    from sage_ft.training import engine

    config, _ = TrainConfig.from_dict({"model_name_or_path": "proxy", "dataset": "proxy.jsonl", "lora_rank": 8,
                                       "lora_target": "all", "seed": SEED, "torch_compile": compiled})
    engine.seed_everything(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**STRUCTURE, attn_implementation="sdpa", use_cache=False))
    model = engine.apply_lora(model, config)
    with torch.no_grad():  # non-zero B, so the LoRA path's gradients flow as in a running training
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    if compiled:
        engine.compile_decoder_layers(model)
    return model.train()


def packed_batch() -> dict[str, Any]:
    from sage_ft.training.collate import REAL_TOKENS_KEY, PackingCollator

    ids = [[(7 * i + 3 * j) % 2000 + 3 for j in range(n)] for i, n in enumerate(SAMPLE_LENGTHS)]
    samples = [{"input_ids": s, "labels": list(s)} for s in ids]
    batch = PackingCollator(pad_token_id=0, max_row_len=1024)._packed(samples, [list(range(len(samples)))])
    batch.pop(REAL_TOKENS_KEY, None)
    return batch


def micro_step(model: Any, batch: dict[str, Any]) -> float:
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return float(loss.detach())


def measure(rounds: int, steps_per_round: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # a GPU run's host work is one thread
    batch = packed_batch()
    sides = {"eager": build(False), "torch_compile": build(True)}
    warmup_s, losses = {}, {}
    for name, model in sides.items():
        start = time.perf_counter()
        losses[name] = [micro_step(model, batch) for _ in range(3)]  # compiles (one graph, then the others' inputs)
        warmup_s[name] = time.perf_counter() - start
    per_step: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (sides if r % 2 == 0 else reversed(list(sides))):
            start = time.perf_counter()
            for _ in range(steps_per_round):
                micro_step(sides[name], batch)
            per_step[name].append((time.perf_counter() - start) / steps_per_round)
    rows = [{"variant": name, "ms_per_micro_step": 1e3 * statistics.median(per_step[name]),
             "first_3_steps_s": warmup_s[name], "loss_step_0": losses[name][0]} for name in sides]
    eager, compiled = rows
    for row in rows:
        row["ratio"] = eager["ms_per_micro_step"] / row["ms_per_micro_step"]
    return {"structure": STRUCTURE, "tokens": sum(SAMPLE_LENGTHS), "rounds": rounds, "steps_per_round": steps_per_round,
            "rows": rows, "host_speedup": compiled["ratio"],
            "loss_delta": abs(compiled["loss_step_0"] - eager["loss_step_0"]),
            "compile_s": compiled["first_3_steps_s"] - eager["first_3_steps_s"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 rounds instead of 10")
    args = parser.parse_args(argv)
    result = measure(rounds=4 if args.quick else 10, steps_per_round=10)
    print_table(result["rows"], ["variant", "ms_per_micro_step", "ratio", "first_3_steps_s", "loss_step_0"])
    print(f"torch_compile: {result['compile_s']:.0f} s of compilation in the first steps; same loss within "
          f"{result['loss_delta']:.1e}; host work per micro-step {result['host_speedup']:.2f}x less "
          f"(Qwen2-0.5B's structure at negligible compute, one thread; a proxy for the GPU's launch-bound regime)")
    path = save_results("host_overhead", result)
    bar_chart(path.with_suffix(".html"), "Host time per micro-step (lower is better)",
              [r["variant"] for r in result["rows"]], [r["ms_per_micro_step"] for r in result["rows"]], "ms")
    print(f"speedup: {result['host_speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
