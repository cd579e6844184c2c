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

``--compute-bound`` instead asks whether torch_compile pays for CPU training itself: the CPU
training bench's shape (hidden 512 x 4 layers, batches of 8 log-normal chat-length samples, both
threads), fp32 and, on CPUs with native bf16, bf16 autocast (about 4 minutes; not in bench.sh).

    python bench/host_overhead.py [--quick] [--compute-bound]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bar_chart, print_table, save_results  # noqa: E402

# Qwen2-0.5B's structure (24 layers, 14:2 query:KV heads, tied embeddings), widths cut to a minimum.
LAUNCH_BOUND = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 224,
                "intermediate_size": 64, "vocab_size": 2048, "tie_word_embeddings": True}
# The CPU training bench's model size (bench/common.build_bench_model), in the same layout.
COMPUTE_BOUND = {"num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8, "hidden_size": 512,
                 "intermediate_size": 1280, "vocab_size": 16000, "tie_word_embeddings": False}
SEED = 0


def build(structure: dict[str, Any], compiled: bool) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sage_ft.config import TrainConfig
    from sage_ft.training import engine

    config, _ = TrainConfig.from_dict({"model_name_or_path": "proxy", "dataset": "proxy.jsonl", "lora_rank": 8,
                                       "lora_target": "all", "seed": SEED})
    engine.seed_everything(SEED)
    model = Qwen2ForCausalLM(Qwen2Config(**structure, attn_implementation="sdpa", use_cache=False))
    model = engine.apply_lora(model, config)
    with torch.no_grad():  # non-zero B, so the LoRA path's gradients flow as in a running training
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    if compiled:
        engine.compile_decoder_layers(model)
    return model.train()


def batches(lengths: list[list[int]], vocab: int) -> list[dict[str, Any]]:
    """One collated batch per list of sample lengths (sage-ft's collator picks packed or padded)."""
    from sage_ft.training.collate import REAL_TOKENS_KEY, PackingCollator

    rng = random.Random(SEED)
    collator = PackingCollator(pad_token_id=0, max_row_len=1024)
    out = []
    for group in lengths:
        samples = [{"input_ids": ids, "labels": list(ids)} for ids in
                   ([rng.randrange(3, vocab) for _ in range(n)] for n in group)]
        batch = collator(samples)
        batch.pop(REAL_TOKENS_KEY, None)
        out.append(batch)
    return out


def micro_step(model: Any, batch: dict[str, Any], bf16: bool) -> float:
    import torch

    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    return float(loss.detach())


def measure(structure: dict[str, Any], data: list[dict[str, Any]], rounds: int, repeats: int,
            bf16: bool = False) -> dict[str, Any]:
    """Eager vs compiled: first steps (compilation) apart, then alternating timed rounds."""
    sides = {"eager": build(structure, False), "torch_compile": build(structure, True)}
    warmup_s, losses = {}, {}
    for name, model in sides.items():
        start = time.perf_counter()
        losses[name] = [micro_step(model, batch, bf16) for batch in (data * 3)[:3]]  # compiles here
        warmup_s[name] = time.perf_counter() - start
    per_step: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(rounds):
        for name in (sides if r % 2 == 0 else reversed(list(sides))):
            start = time.perf_counter()
            for _ in range(repeats):
                for batch in data:
                    micro_step(sides[name], batch, bf16)
            per_step[name].append((time.perf_counter() - start) / (repeats * len(data)))
    rows = [{"variant": name, "precision": "bf16" if bf16 else "fp32",
             "ms_per_micro_step": 1e3 * statistics.median(per_step[name]), "first_3_steps_s": warmup_s[name],
             "loss_step_0": losses[name][0]} for name in sides]
    eager, compiled = rows
    for row in rows:
        row["ratio"] = eager["ms_per_micro_step"] / row["ms_per_micro_step"]
    return {"structure": structure, "rounds": rounds, "rows": rows, "speedup": compiled["ratio"],
            "loss_delta": max(abs(a - b) for a, b in zip(losses["eager"], losses["torch_compile"], strict=True)),
            "compile_s": compiled["first_3_steps_s"] - eager["first_3_steps_s"]}


def launch_bound(quick: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # a GPU run's host work is one thread
    data = batches([[9, 6, 12, 8]], LAUNCH_BOUND["vocab_size"])  # one packed row of 35 tokens
    return measure(LAUNCH_BOUND, data, rounds=4 if quick else 10, repeats=10)


def compute_bound(quick: bool) -> list[dict[str, Any]]:
    from sage_ft.training.engine import cpu_has_bf16

    rng = random.Random(SEED)
    lengths = [[min(1024, max(16, int(rng.lognormvariate(5.4, 0.6)))) for _ in range(8)]
               for _ in range(2 if quick else 6)]  # mean ~256 tokens, like the training bench's data
    data = batches(lengths, COMPUTE_BOUND["vocab_size"])
    return [measure(COMPUTE_BOUND, data, rounds=2 if quick else 4, repeats=1, bf16=bf16)
            for bf16 in ((False, True) if cpu_has_bf16() else (False,))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--compute-bound", action="store_true", help="the CPU training shape instead (~4 min)")
    args = parser.parse_args(argv)
    columns = ["variant", "precision", "ms_per_micro_step", "ratio", "first_3_steps_s", "loss_step_0"]
    if args.compute_bound:
        results = compute_bound(args.quick)
        print_table([row for result in results for row in result["rows"]], columns)
        for result in results:
            print(f"{result['rows'][0]['precision']}: torch_compile {result['speedup']:.2f}x per micro-step after "
                  f"{result['compile_s']:.0f} s of compilation; losses within {result['loss_delta']:.1e}")
        save_results("host_overhead_compute_bound", {"runs": results})
        print(f"speedup: {min(r['speedup'] for r in results):.2f}x")
        return 0
    result = launch_bound(args.quick)
    print_table(result["rows"], columns)
    print(f"torch_compile: {result['compile_s']:.0f} s of compilation in the first steps; same loss within "
          f"{result['loss_delta']:.1e}; host work per micro-step {result['speedup']:.2f}x less "
          f"(Qwen2-0.5B's structure at negligible compute, one thread; a proxy for the GPU's launch-bound regime)")
    path = save_results("host_overhead", result)
    bar_chart(path.with_suffix(".html"), "Host time per micro-step (lower is better)",
              [r["variant"] for r in result["rows"]], [r["ms_per_micro_step"] for r in result["rows"]], "ms")
    print(f"speedup: {result['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
