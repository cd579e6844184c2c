"""Training throughput: sage-ft's trainer vs the plain transformers Trainer + peft a user would write.

Same model (Llama hidden 512 x 4 layers, built locally), same data (log-normal chat lengths, mean
~256 tokens, cutoff 1024), same LoRA (r8, all linear layers), same samples per optimizer step and
the same number of steps. Reported: useful (non-padding) tokens/s, seconds/step, peak RSS, and the
loss of each trained adapter on the same held-out set (speed may not come from training something
else). The headline compares both in fp32; bf16 autocast is reported on its own line. Then the
monitoring overhead: the same kind of run bare vs as a task of the running app watched by a page
polling every 2 s (``bench/monitoring.py``; ``--no-monitoring`` skips it).

    python bench/train_throughput.py [--quick] [--no-monitoring]

The last line printed is ``speedup: <ratio>x`` for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import monitoring  # noqa: E402
from bench.common import (  # noqa: E402
    bar_chart,
    bench_home,
    build_bench_model,
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
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                      adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["input_ids"]])
            labels = torch.tensor([s["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            if n == 0:
                continue
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


def worker_baseline(model_dir: Path, data: Path, eval_data: Path, out: Path, steps: int, batch: int, cutoff: int) -> dict:
    """What a user would write: Trainer + peft LoRA, pad-to-longest collation, random batches, fp32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    torch.manual_seed(SEED)
    tokenizer, samples = _tokenized(model_dir, data, cutoff)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    counts = {"useful": 0, "padded": 0}

    def counting_collator(features):
        batch_ = collator(features)
        counts["useful"] += int(batch_["attention_mask"].sum())
        counts["padded"] += batch_["attention_mask"].numel()
        return batch_

    timing: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            timing["start"] = time.perf_counter()

        def on_train_end(self, *a, **k):
            timing["end"] = time.perf_counter()

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps,
                             learning_rate=LR, lr_scheduler_type="cosine", logging_steps=1, save_strategy="no",
                             report_to=[], seed=SEED, use_cpu=True, dataloader_num_workers=0,
                             remove_unused_columns=False, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=samples, data_collator=counting_collator,
                      callbacks=[Clock()])
    trainer.train()
    model.save_pretrained(out / "adapter")
    seconds = timing["end"] - timing["start"]
    return {"variant": "baseline (Trainer+peft, padded, fp32)", "seconds": seconds, "steps": steps,
            "useful_tokens": counts["useful"], "padding_fraction": 1 - counts["useful"] / counts["padded"],
            "peak_rss_mb": peak_rss_mb(), "eval_loss": eval_loss(model_dir, out / "adapter", eval_data, cutoff)}


def worker_sageft(model_dir: Path, data: Path, eval_data: Path, out: Path, steps: int, batch: int, cutoff: int,
                  precision: str) -> dict:
    """sage-ft's in-process trainer with its defaults (only precision pinned for a fair headline)."""
    from sage_ft.config import TrainConfig
    from sage_ft.training import FineTuneRun

    config, _ = TrainConfig.from_dict({
        "model_name_or_path": str(model_dir), "dataset": str(data), "max_steps": steps,
        "per_device_train_batch_size": batch, "cutoff_len": cutoff, "learning_rate": LR, "lora_rank": LORA_R,
        "lora_target": "all", "precision": precision, "seed": SEED, "output_dir": str(out),
        "overwrite_output_dir": True, "save_steps": 10_000, "logging_steps": 1,
    })
    run = FineTuneRun(config)
    result = run.run()
    if result.status != "completed":
        raise RuntimeError(f"sage-ft run {result.status}: {result.error}")
    metrics = result.metrics
    # The Trainer's own train_runtime: the training loop only, like the baseline's clock callback
    # (adapter saving and meta writing after training are not counted on either side).
    seconds = float(metrics["train_runtime"])
    useful = metrics.get("tokens_seen")  # counted with include_num_input_tokens_seen="non_padding"
    return {"variant": f"sage-ft ({precision})", "seconds": seconds, "steps": steps, "useful_tokens": useful,
            "padding_fraction": metrics.get("padding_fraction"), "peak_rss_mb": peak_rss_mb(),
            "eval_loss": eval_loss(model_dir, Path(result.output_dir) / "lora", eval_data, cutoff)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and samples (a smoke run)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cutoff", type=int, default=1024)
    parser.add_argument("--no-monitoring", action="store_true", help="skip the monitoring-overhead runs")
    parser.add_argument("--worker", choices=["baseline", "sageft"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--paths", help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (4 if args.quick else 12)

    if args.worker:
        p = json.loads(args.paths)
        model_dir, data, eval_data, out = (Path(p[k]) for k in ("model", "data", "eval", "out"))
        if args.worker == "baseline":
            res = worker_baseline(model_dir, data, eval_data, out, steps, args.batch, args.cutoff)
        else:
            res = worker_sageft(model_dir, data, eval_data, out, steps, args.batch, args.cutoff, args.precision)
        print(json.dumps(res))
        return 0

    home = bench_home()
    model_dir = build_bench_model(home / "llama-512x4")
    data = lognormal_chat_dataset(home / f"chat-{steps * args.batch}.jsonl", steps * args.batch, cutoff=args.cutoff)
    eval_data = lognormal_chat_dataset(home / "chat-eval.jsonl", 16 if args.quick else 32, cutoff=args.cutoff, seed=99)
    rows = []
    variants = [("baseline", "fp32"), ("sageft", "fp32"), ("sageft", "bf16")]
    for worker, precision in variants:
        out = home / "out" / f"{worker}-{precision}"
        paths = json.dumps({"model": str(model_dir), "data": str(data), "eval": str(eval_data), "out": str(out)})
        res = run_worker(SCRIPT, ["--worker", worker, "--precision", precision, "--steps", str(steps),
                                  "--batch", str(args.batch), "--cutoff", str(args.cutoff), "--paths", paths])
        res["tokens_per_s"] = res["useful_tokens"] / res["seconds"] if res.get("useful_tokens") else None
        res["s_per_step"] = res["seconds"] / res["steps"]
        rows.append(res)
        print(f"  done: {res['variant']}", file=sys.stderr)
    base = rows[0]
    for r in rows:
        r["ratio"] = (r["tokens_per_s"] / base["tokens_per_s"]) if r.get("tokens_per_s") else None
        r["loss_delta"] = r["eval_loss"] - base["eval_loss"]
    print_table(rows, ["variant", "tokens_per_s", "ratio", "s_per_step", "padding_fraction", "peak_rss_mb",
                       "eval_loss", "loss_delta"])
    headline = rows[1]["ratio"]
    bf16_gain = (rows[2]["tokens_per_s"] / rows[1]["tokens_per_s"]) if rows[2].get("tokens_per_s") else None
    payload = {"steps": steps, "batch": args.batch, "cutoff": args.cutoff, "rows": rows,
               "speedup_fp32": headline, "bf16_gain_over_sageft_fp32": bf16_gain}
    print(f"bf16 autocast on top of sage-ft fp32: {bf16_gain:.2f}x" if bf16_gain else "bf16: n/a")
    if not args.no_monitoring:
        m_steps = monitoring.QUICK_STEPS if args.quick else monitoring.STEPS
        m_data = lognormal_chat_dataset(home / f"chat-{m_steps * args.batch}.jsonl", m_steps * args.batch,
                                        cutoff=args.cutoff)
        payload["monitoring"] = monitoring.measure(model_dir, m_data, m_steps, args.batch, args.cutoff, "fp32",
                                                   pairs=monitoring.QUICK_PAIRS if args.quick else monitoring.PAIRS)
        monitoring.report(payload["monitoring"])
    bar_chart(save_results("train_throughput", payload).with_suffix(".html"), "Useful tokens/s (higher is better)",
              [r["variant"] for r in rows], [r["tokens_per_s"] or 0 for r in rows], "tokens/s")
    print(f"speedup: {headline:.2f}x" if headline else "speedup: n/a (no token count)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
