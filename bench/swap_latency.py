"""Swap latency on a real vLLM child: runtime LoRA switches, base-model switches, adapter count.

1. Runtime LoRA switch: p50/p95 over N switches, from ``switch()`` to the first token of a reply from
   the new adapter — each switch to a never-seen adapter version (a real load) and, separately,
   to an already loaded one (selection only).
2. Base-model switch while a client chats in a loop: zero-downtime vs stop-then-start — time to the
   first token of the new model, and ok / failed / hung client requests during the switch.
3. Chat latency with 1, 2 and 4 adapters loaded (ratio to 1).

    python bench/swap_latency.py [--quick]      # table on stdout, JSON + HTML under bench/results/
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SAGE_FT_HOME", str(Path(__file__).resolve().parent / ".cache" / "serving-home"))

from bench.common import RESULTS, bar_chart, print_table, save_results  # noqa: E402

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
HANG_LIMIT_S = 90.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def make_adapter(base_dir: Path, out_dir: Path, seed: int, rank: int = 8) -> Path:
    """A LoRA of the demo model with random non-zero weights (changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


def first_token_s(manager, model: str | None = None) -> float:
    from sage_ft.serving import stream_chat

    t0 = time.perf_counter()
    for _ in stream_chat(manager, HELLO, model=model, temperature=0.0, max_tokens=8):
        return time.perf_counter() - t0
    return time.perf_counter() - t0


def full_reply_s(manager, model: str | None, max_tokens: int = 32) -> float:
    from sage_ft.serving import chat

    t0 = time.perf_counter()
    chat(manager, HELLO, model=model, temperature=0.0, max_tokens=max_tokens)
    return time.perf_counter() - t0


def lora_switches(manager, adapters: list[Path], work: Path, n: int) -> dict:
    fresh, cached, loads = [], [], []
    for i in range(n):  # a new adapter version every time: a real /v1/load_lora_adapter
        version = work / f"v{i}"
        shutil.copytree(adapters[i % len(adapters)], version)
        t0 = time.perf_counter()
        result = manager.switch(str(version))
        assert result.outcome == "live", result.message
        switch_s = time.perf_counter() - t0
        fresh.append(switch_s + first_token_s(manager))
        loads.append(result.timings.get("adapter_load_s", switch_s))
        if i >= 2:  # keep the number of loaded adapters bounded
            shutil.rmtree(work / f"v{i - 2}", ignore_errors=True)
    names = []
    for path in adapters:
        names.append(manager.switch(str(path)).served.name)
    for i in range(n):  # between adapters already loaded: selection only
        t0 = time.perf_counter()
        result = manager.switch(str(adapters[i % len(adapters)]))
        switch_s = time.perf_counter() - t0
        cached.append(switch_s + first_token_s(manager))
    return {"fresh_p50_s": percentile(fresh, 0.5), "fresh_p95_s": percentile(fresh, 0.95),
            "cached_p50_s": percentile(cached, 0.5), "cached_p95_s": percentile(cached, 0.95),
            "load_p50_s": percentile(loads, 0.5), "n": n, "fresh_s": fresh, "cached_s": cached}


class ChattingClient:
    def __init__(self, manager):
        self.manager, self.ok, self.failed, self.hung, self.longest = manager, 0, 0, 0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from sage_ft.serving import ChatError, chat

        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                chat(self.manager, HELLO, temperature=0.0, max_tokens=24)
                self.ok += 1
                time.sleep(0.3)
            except ChatError:
                self.failed += 1
                time.sleep(0.2)
            took = time.monotonic() - t0
            self.longest = max(self.longest, took)
            if took > HANG_LIMIT_S:
                self.hung += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=HANG_LIMIT_S)
        if self._thread.is_alive():
            self.hung += 1


def base_switch(manager, target: Path, strategy: str) -> dict:
    with ChattingClient(manager) as client:
        time.sleep(2.0)
        t0 = time.perf_counter()
        result = manager.switch(str(target), strategy=strategy)
        to_first_token = time.perf_counter() - t0 + first_token_s(manager)
        time.sleep(2.0)
    return {"strategy": strategy, "outcome": result.outcome, "mode": result.mode,
            "switch_to_first_token_s": to_first_token, "server_start_s": result.timings.get("server_start_s"),
            "client_ok": client.ok, "client_failed": client.failed, "client_hung": client.hung,
            "client_longest_s": client.longest}


def adapter_count_latency(manager, adapters: list[Path], repeats: int) -> list[dict]:
    rows, baseline = [], None
    for count in (1, 2, 4):
        names = [manager.load_adapter(str(p)) for p in adapters[:count]]
        for name in names:  # warm each adapter once
            full_reply_s(manager, name)
        times = [full_reply_s(manager, names[i % count]) for i in range(repeats)]
        median = statistics.median(times)
        baseline = baseline or median
        rows.append({"adapters_loaded": count, "median_reply_s": median, "ratio_to_1": median / baseline})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer switches/repeats (a few minutes)")
    parser.add_argument("--skip-base", action="store_true", help="skip the base-model switches (2 extra starts)")
    args = parser.parse_args(argv)
    n_switches, repeats = (6, 4) if args.quick else (20, 12)

    from sage_ft.models.demo import ensure_demo_model
    from sage_ft.serving import ServerManager
    from sage_ft.serving.ports import find_free_port

    base = ensure_demo_model()
    work = Path(os.environ["SAGE_FT_HOME"]) / "bench-swap"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    adapters = [make_adapter(base, work / f"adapter-{i}", seed=i) for i in range(4)]
    other = work / "demo-copy"
    shutil.copytree(base, other)

    manager = ServerManager("demo", port=find_free_port(18500), max_loras=4, start_timeout_s=900)
    try:
        t0 = time.perf_counter()
        manager.start()
        cold_start_s = time.perf_counter() - t0
        lora = lora_switches(manager, adapters, work, n_switches)
        counts = adapter_count_latency(manager, adapters, repeats)
        base_rows = []
        if not args.skip_base:
            base_rows.append(base_switch(manager, other, "zero_downtime"))
            base_rows.append(base_switch(manager, base, "stop_then_start"))
    finally:
        manager.close()

    print(f"cold start of the server: {cold_start_s:.1f} s\n")
    print(f"runtime LoRA switch -> first token ({lora['n']} switches each)")
    print_table([{"kind": "new adapter version (load)", "p50_s": lora["fresh_p50_s"], "p95_s": lora["fresh_p95_s"],
                  "p95_vs_cold_start": lora["fresh_p95_s"] / cold_start_s},
                 {"kind": "already loaded (select)", "p50_s": lora["cached_p50_s"], "p95_s": lora["cached_p95_s"],
                  "p95_vs_cold_start": lora["cached_p95_s"] / cold_start_s}],
                ["kind", "p50_s", "p95_s", "p95_vs_cold_start"])
    print("\nchat latency with N adapters loaded")
    print_table(counts, ["adapters_loaded", "median_reply_s", "ratio_to_1"])
    if base_rows:
        print("\nbase-model switch with a client chatting in a loop")
        print_table(base_rows, ["strategy", "outcome", "switch_to_first_token_s", "client_ok", "client_failed",
                                "client_hung", "client_longest_s"])
        zd, sts = base_rows
        print(f"\nzero-downtime / stop-then-start time to first token: "
              f"{zd['switch_to_first_token_s'] / sts['switch_to_first_token_s']:.2f}x")
    print(f"runtime LoRA p95 target < 1 s: {'met' if lora['fresh_p95_s'] < 1.0 else 'NOT met'} "
          f"({lora['fresh_p95_s']:.3f} s)")
    save_results("swap_latency", {"quick": args.quick, "cold_start_s": cold_start_s, "lora_switch": lora,
                                  "adapter_count": counts, "base_switch": base_rows})
    bar_chart(RESULTS / "swap_latency.html", "Runtime LoRA switch to first token (s)",
              ["load p50", "load p95", "select p50", "select p95"],
              [lora["fresh_p50_s"], lora["fresh_p95_s"], lora["cached_p50_s"], lora["cached_p95_s"]], "seconds")
    print(f"results: {RESULTS / 'swap_latency.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
