"""Training throughput: sage-ft's trainer vs the plain transformers Trainer + peft a user would write.

Same model (Llama hidden 512 x 4 layers, built locally), same data (log-normal chat lengths, mean
~256 tokens, cutoff 1024), same LoRA (r8, all linear layers), same samples per optimizer step and
the same number of steps. Reported: useful (non-padding) tokens/s, seconds/step, peak RSS, and the
loss of each trained adapter on the same held-out set (speed may not come from training something
else). The headline compares both in fp32; bf16 autocast is reported on its own line. Then the
monitoring overhead: the same kind of run bare vs as a task of the running app watched by a page
polling every 2 s (``bench/monitoring.py``; ``--no-monitoring`` skips it).

On a CUDA machine (``--device cuda``, the default where one is visible) the model is Qwen2-0.5B's
shape at bf16 on both sides, 64 samples per optimizer step written as batch 8 x accumulation 8 (what
fits the plain baseline); sage-ft applies its own recommendation for the detected GPU (``recommend``:
the same 64 samples per step, in as few micro-batches as fit). Timed over the steady state (the
first steps, with CUDA and Triton warm-up, are left out); reported: tokens/s, peak
``torch.cuda.max_memory_allocated`` and MFU (6 x parameters x tokens/s over the bf16 matmul rate
measured on the same GPU in the same run). Rows, most important first (a GPU lease is short;
``bench/gpu_session.sh`` runs this there): the baseline; sage-ft's bf16 defaults; the same with the
opt-in ``torch_compile`` (compilation falls in the untimed first steps; off by default until this
row shows it pays on a GPU: ``bench/host_overhead.py`` measures the host work it removes, on CPU);
the bf16 defaults with ``micro_batch_by_tokens`` off (exactly 'accumulation' micro-batches per
step: with the column passes/step, what splitting a step by tokens saves on a launch-bound GPU);
and sage-ft fp32 (the bf16 gain on its own line). Each row's results are saved as it lands, and a
failed row is reported without costing the others.

    python bench/train_throughput.py [--quick] [--no-monitoring] [--device auto|cpu|cuda]

The last line printed is ``speedup: <ratio>x`` for scripts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import monitoring  # noqa: E402
from bench.common import (  # noqa: E402
    bar_chart,
    bench_home,
    build_bench_model,
    build_qwen2_shaped_model,
    lognormal_chat_dataset,
    peak_rss_mb,
    print_table,
    run_worker,
    save_results,
)

SCRIPT = Path(__file__).resolve()
LORA_R = 8
LR = 2e-4
SEED = 0


def _tokenized(model_dir: Path, data: Path, cutoff: int):
    from transformers import AutoTokenizer

    from sage_ft.data.load import load_dataset
    from sage_ft.data.tokenize import tokenize_conversations

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    report = load_dataset(str(data))
    return tokenizer, tokenize_conversations(report.conversations, tokenizer, cutoff, "auto")


def eval_loss(model_dir: Path, adapter_dir: Path, eval_data: Path, cutoff: int) -> float:
    """Token-mean loss of base + adapter on the held-out set (identical procedure for both)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer, samples = _tokenized(model_dir, eval_data, cutoff)
    device = "cuda" if _cuda() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device),
                                      adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.as_tensor(s["input_ids"], dtype=torch.long, device=device)[None]
            labels = torch.as_tensor(s["labels"], dtype=torch.long, device=device)[None]
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _peak_memory() -> dict[str, float]:
    """Peak RSS, and on a GPU the peak of torch.cuda.max_memory_allocated (GiB)."""
    out = {"peak_rss_mb": peak_rss_mb()}
    if _cuda():
        import torch

        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _steady(points: list[tuple[int, float, int]], warmup: int) -> dict[str, Any]:
    """Seconds, useful tokens and steps between the log point of step ``warmup`` and the last one,
    and every step's own seconds (warm-up included).

    ``points`` are (step, time, tokens consumed so far) at each logged step. Step 0 is the start of
    training; on a GPU the first steps carry CUDA/cuBLAS/Triton start-up and are left out. The
    per-step times show what a total hides: a recompilation (torch_compile) or a stall inside the
    timed steps.
    """
    first = next(p for p in points if p[0] == warmup)
    last = points[-1]
    return {"seconds": last[1] - first[1], "useful_tokens": last[2] - first[2], "steps": last[0] - first[0],
            "step_seconds": [round(b[1] - a[1], 4) for a, b in itertools.pairwise(points)]}


def worker_baseline(model_dir: Path, data: Path, eval_data: Path, out: Path, steps: int, batch: int, accum: int,
                    cutoff: int, precision: str, warmup: int) -> dict:
    """What a user would write: Trainer + peft LoRA, pad-to-longest collation, random batches.

    CPU: fp32. GPU: the model loaded in bf16 and ``bf16=True``, the usual recipe.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = _cuda()
    torch.manual_seed(SEED)
    tokenizer, samples = _tokenized(model_dir, data, cutoff)
    # As a user's own tokenization gives them: Python lists (sage-ft keeps int32 arrays).
    samples = [{key: value.tolist() for key, value in sample.items()} for sample in samples]
    dtype = torch.bfloat16 if cuda and precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    per_batch: list[int] = []  # useful tokens of each micro-batch, in the order they are consumed
    counts = {"useful": 0, "padded": 0}

    def counting_collator(features):
        batch_ = collator(features)
        useful = int(batch_["attention_mask"].sum())
        per_batch.append(useful)
        counts["useful"] += useful
        counts["padded"] += batch_["attention_mask"].numel()
        return batch_

    points: list[tuple[int, float, int]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **k):
            points.append((0, time.perf_counter(), 0))

        def on_log(self, args, state, control, logs=None, **k):  # after the step's loss is read (a sync)
            if logs and "loss" in logs:
                points.append((state.global_step, time.perf_counter(), sum(per_batch[:state.global_step * accum])))

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
                             max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine", logging_steps=1,
                             save_strategy="no", report_to=[], seed=SEED, use_cpu=not cuda, bf16=cuda and precision == "bf16",
                             dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=counting_collator,
                      callbacks=[Clock()])
    trainer.train()
    memory = _peak_memory()
    model.save_pretrained(out / "adapter")
    return {"variant": f"baseline (Trainer+peft, padded, {precision})", **_steady(points, warmup),
            "padding_fraction": 1 - counts["useful"] / counts["padded"],
            "micro_batch": f"{batch} x {accum}", "passes_per_step": accum, **memory,
            "eval_loss": eval_loss(model_dir, out / "adapter", eval_data, cutoff)}


def worker_sageft(model_dir: Path, data: Path, eval_data: Path, out: Path, steps: int, batch: int, accum: int,
                  cutoff: int, precision: str, warmup: int, torch_compile: bool = False,
                  by_tokens: str = "auto") -> dict:
    """sage-ft's in-process trainer with its defaults (only precision pinned for a fair headline).

    On a GPU, the settings sage-ft recommends for the detected device are applied first, as the
    Train tab does: the same samples per optimizer step, split into as few micro-batches as fit.
    """
    from sage_ft.config import TrainConfig
    from sage_ft.training import FineTuneRun

    config, _ = TrainConfig.from_dict({
        "model_name_or_path": str(model_dir), "dataset": str(data), "max_steps": steps,
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum, "cutoff_len": cutoff,
        "learning_rate": LR, "lora_rank": LORA_R, "lora_target": "all", "precision": precision, "seed": SEED,
        "output_dir": str(out), "overwrite_output_dir": True, "save_steps": 10_000, "logging_steps": 1,
        "torch_compile": torch_compile, "micro_batch_by_tokens": by_tokens,
    })
    recommended = {}
    if _cuda():
        from sage_ft.estimate import recommend

        advice = recommend(config, model_dir)
        config, recommended = advice.config, advice.changes
    run = FineTuneRun(config)
    result = run.run()
    if result.status != "completed":
        raise RuntimeError(f"sage-ft run {result.status}: {result.error}")
    memory = _peak_memory()
    metrics = result.metrics
    # Log points from the run's own events (time and the Trainer's non-padding token count per step).
    points = [(0, run.emitter.get_history("training_start")[0]["time"], 0)]
    points += [(e["step"], e["time"], e["tokens_seen"]) for e in run.emitter.get_history("metric_update")
               if e.get("loss") is not None]
    notes = [precision] + (["torch_compile"] if torch_compile else []) + (
        [] if by_tokens == "auto" else [f"micro_batch_by_tokens {by_tokens}"])
    label = f"sage-ft ({', '.join(notes)})"
    return {"variant": label, **_steady(points, warmup),
            "padding_fraction": metrics.get("padding_fraction"), **memory,
            "micro_batch": f"{config.per_device_train_batch_size} x {config.gradient_accumulation_steps}",
            "passes_per_step": metrics.get("micro_batches_per_step"),
            "recommended": recommended, "fused_cross_entropy": run._meta.get("fused_cross_entropy"),
            "eval_loss": eval_loss(model_dir, Path(result.output_dir) / "lora", eval_data, cutoff)}


def measure_matmul_peak() -> float:
    """bf16 matmul FLOP/s of this GPU (8192^3 products on random data, median of 20 after warm-up)."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del a, b
    torch.cuda.empty_cache()  # the training rows run in child processes; leave them the whole GPU
    return 2 * n**3 / sorted(times)[len(times) // 2]


def count_params(model_dir: Path) -> int:
    from sage_ft.estimate import model_facts

    return model_facts(model_dir).n_params


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8, help="samples per micro-batch as written (both sides)")
    parser.add_argument("--accum", type=int, default=None, help="micro-batches per optimizer step (CPU 1, GPU 8)")
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--no-monitoring", action="store_true", help="skip the monitoring-overhead runs")
    parser.add_argument("--worker", choices=["baseline", "sageft"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--torch-compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch-by-tokens", choices=["auto", "on", "off"], default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        p = json.loads(args.paths)
        model_dir, data, eval_data, out = (Path(p[k]) for k in ("model", "data", "eval", "out"))
        common = (model_dir, data, eval_data, out, args.steps, args.batch, args.accum, args.cutoff, args.precision,
                  args.warmup)
        res = worker_baseline(*common) if args.worker == "baseline" else worker_sageft(
            *common, args.torch_compile, by_tokens=args.micro_batch_by_tokens)
        print(json.dumps(res))
        return 0

    gpu = args.device == "cuda" or (args.device == "auto" and _cuda())
    if not gpu:  # the workers decide by what they see: --device cpu on a GPU machine hides the GPUs
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    home = bench_home()
    if gpu:
        steps = args.steps or (8 if args.quick else 24)
        accum, warmup = args.accum or 8, 3
        model_dir = build_qwen2_shaped_model(home / "qwen2-0.5b-shape")
        # Headline at bf16 on both sides; then the opt-in torch_compile (default off until measured here;
        # bench/host_overhead.py), the default bf16 run with sample-count micro-batches (what
        # micro_batch_by_tokens saves), and last sage-ft's own fp32 run (the bf16 gain on its own line;
        # measured before, so it is the row a time-limited GPU lease can best do without).
        variants = [("baseline", "bf16"), ("sageft", "bf16"), ("sageft", "bf16+compile"), ("sageft", "bf16+fixed"),
                    ("sageft", "fp32")]
    else:
        steps = args.steps or (4 if args.quick else 12)
        accum, warmup = args.accum or 1, 0
        model_dir = build_bench_model(home / "llama-512x4")
        variants = [("baseline", "fp32"), ("sageft", "fp32"), ("sageft", "bf16")]
    samples = steps * args.batch * accum
    data = lognormal_chat_dataset(home / f"chat-{samples}.jsonl", samples, cutoff=args.cutoff)
    eval_data = lognormal_chat_dataset(home / "chat-eval.jsonl", 16 if args.quick else 32, cutoff=args.cutoff, seed=99)
    name = "train_throughput_gpu" if gpu else "train_throughput"
    payload: dict = {"device": "cuda" if gpu else "cpu", "steps": steps, "timed_from_step": warmup,
                     "batch": args.batch, "accum": accum, "cutoff": args.cutoff, "rows": []}
    rows = payload["rows"]
    if gpu:  # first, so that rows saved by a run cut off at a time limit already carry their MFU
        peak, n_params = measure_matmul_peak(), count_params(model_dir)
        payload.update(matmul_peak_tflops=peak / 1e12, n_params=n_params)
    for worker, variant in variants:
        out = home / "out" / f"{worker}-{variant}"
        precision, *options = variant.split("+")
        paths = json.dumps({"model": str(model_dir), "data": str(data), "eval": str(eval_data), "out": str(out)})
        started = time.perf_counter()
        try:
            res = run_worker(SCRIPT, ["--worker", worker, "--precision", precision, "--steps", str(steps),
                                      "--batch", str(args.batch), "--accum", str(accum), "--cutoff", str(args.cutoff),
                                      "--warmup", str(warmup), "--paths", paths]
                             + (["--torch-compile"] if "compile" in options else [])
                             + (["--micro-batch-by-tokens", "off"] if "fixed" in options else []))
        except RuntimeError as exc:  # one broken variant (a compile error, say) must not cost the others
            rows.append({"key": f"{worker}-{variant}", "variant": f"{worker} ({variant}): FAILED", "error": str(exc)})
            print(f"  FAILED: {worker} {variant}:\n{exc}", file=sys.stderr, flush=True)
            continue
        res["key"], res["wall_s"] = f"{worker}-{variant}", time.perf_counter() - started
        res["tokens_per_s"] = res["useful_tokens"] / res["seconds"] if res.get("useful_tokens") else None
        res["s_per_step"] = res["seconds"] / res["steps"]
        timed = sorted(res["step_seconds"][warmup:])
        res["median_step_s"] = timed[len(timed) // 2] if timed else None
        if gpu:
            res["mfu"] = 6 * n_params * res["tokens_per_s"] / peak if res.get("tokens_per_s") else None
        rows.append(res)
        # each row as it lands, and the results so far saved: a run cut off by a time limit (the GPU
        # machines allow 10 minutes a call) still tells what it measured
        save_results(name, payload)
        print(f"  done in {res['wall_s']:.0f} s: {res['variant']}: {res['tokens_per_s'] or 0:,.0f} useful tokens/s, "
              f"{res['s_per_step']:.2f} s/step (median {res['median_step_s'] or 0:.2f}), passes/step {res.get('passes_per_step')}, "
              f"eval loss {res['eval_loss']:.4f}", file=sys.stderr, flush=True)
    by_key = {r["key"]: r for r in rows if "error" not in r}
    base = by_key.get(f"baseline-{variants[0][1]}")
    for r in by_key.values():
        r["ratio"] = r["tokens_per_s"] / base["tokens_per_s"] if base and r.get("tokens_per_s") else None
        r["loss_delta"] = r["eval_loss"] - base["eval_loss"] if base else None
    columns = ["variant", "tokens_per_s", "ratio", "s_per_step", "micro_batch", "passes_per_step", "padding_fraction"]
    if gpu:
        columns += ["peak_gpu_gib", "mfu"]
    else:
        columns += ["peak_rss_mb"]
    print_table(rows, columns + ["eval_loss", "loss_delta"])
    sageft_fp32, sageft_bf16 = by_key.get("sageft-fp32", {}), by_key.get("sageft-bf16", {})
    headline = by_key.get(f"sageft-{variants[1][1]}", {}).get("ratio")
    bf16_gain = sageft_bf16["tokens_per_s"] / sageft_fp32["tokens_per_s"] \
        if sageft_bf16.get("tokens_per_s") and sageft_fp32.get("tokens_per_s") else None
    payload.update(speedup=headline, bf16_gain_over_sageft_fp32=bf16_gain)
    if gpu:
        print(f"GPU: bf16 matmul peak measured {peak / 1e12:.0f} TFLOP/s; model {n_params / 1e6:.0f}M parameters; "
              f"MFU = 6 x parameters x tokens/s / that peak")
    print(f"bf16 on top of sage-ft fp32: {bf16_gain:.2f}x" if bf16_gain else "bf16: n/a")
    if not args.no_monitoring and not gpu:
        m_steps = monitoring.QUICK_STEPS if args.quick else monitoring.STEPS
        m_data = lognormal_chat_dataset(home / f"chat-{m_steps * args.batch}.jsonl", m_steps * args.batch,
                                        cutoff=args.cutoff)
        payload["monitoring"] = monitoring.measure(model_dir, m_data, m_steps, args.batch, args.cutoff, "fp32",
                                                   pairs=monitoring.QUICK_PAIRS if args.quick else monitoring.PAIRS)
        monitoring.report(payload["monitoring"])
    bar_chart(save_results(name, payload).with_suffix(".html"), "Useful tokens/s (higher is better)",
              [r["variant"] for r in rows], [r.get("tokens_per_s") or 0 for r in rows], "tokens/s")
    print(f"speedup: {headline:.2f}x" if headline else "speedup: n/a (no token count)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
