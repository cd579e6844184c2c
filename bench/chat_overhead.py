"""Chat-path overhead: sage-ft's ``stream_chat`` (what the Chat tab calls) vs the bare ``openai`` client.

Both stream the same greedy reply from the same vLLM server, interleaved (A, B, A, B ...) so load on
the machine hits both alike. Reports median time to first token and tokens/s of each and the
overhead (ratio and milliseconds). Target: <= 5 % or <= 20 ms.

    python bench/chat_overhead.py [--quick]     # table on stdout, JSON + HTML under bench/results/
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("SAGE_FT_HOME", str(Path(__file__).resolve().parent / ".cache" / "serving-home"))

from bench.common import RESULTS, bar_chart, print_table, save_results  # noqa: E402

MESSAGES = [{"role": "user", "content": "Explain what a LoRA adapter is, step by step."}]
MAX_TOKENS = 64


def timed_stream(chunks) -> tuple[float, float, int]:
    """(time to first chunk, decode tokens/s after it, chunks) of an iterator of text chunks."""
    t0 = time.perf_counter()
    first, count = None, 0
    for _ in chunks:
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    rate = (count - 1) / (end - first) if count > 1 and end > first else float("nan")
    return first - t0, rate, count


def via_sage_ft(manager):
    from sage_ft.serving import stream_chat

    return stream_chat(manager, MESSAGES, temperature=0.0, max_tokens=MAX_TOKENS)


def via_openai(client, model: str):
    stream = client.chat.completions.create(model=model, messages=MESSAGES, stream=True, temperature=0.0,
                                            max_tokens=MAX_TOKENS)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            yield chunk.choices[0].delta.content


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 rounds instead of 40")
    args = parser.parse_args(argv)
    rounds = 10 if args.quick else 40

    from openai import OpenAI

    from sage_ft.serving import ServerManager
    from sage_ft.serving.ports import find_free_port

    manager = ServerManager("demo", port=find_free_port(18600), start_timeout_s=900)
    try:
        manager.start()
        endpoint = manager.endpoint()
        client = OpenAI(base_url=endpoint["base_url"], api_key=endpoint["api_key"], max_retries=0, timeout=120)
        for _ in range(3):  # warm both paths (connections, server caches)
            timed_stream(via_sage_ft(manager))
            timed_stream(via_openai(client, endpoint["model"]))
        ours, direct = [], []
        for i in range(rounds):
            pair = [("sage", lambda: via_sage_ft(manager)), ("direct", lambda: via_openai(client, endpoint["model"]))]
            for name, make in (pair if i % 2 == 0 else pair[::-1]):
                (ours if name == "sage" else direct).append(timed_stream(make()))
    finally:
        manager.close()

    def summary(samples):
        return {"ttft_ms": statistics.median(s[0] for s in samples) * 1000,
                "tokens_per_s": statistics.median(s[1] for s in samples),
                "chunks": statistics.median(s[2] for s in samples)}

    a, b = summary(ours), summary(direct)
    rows = [{"path": "sage-ft stream_chat", **a}, {"path": "openai client direct", **b}]
    ttft_ratio = a["ttft_ms"] / b["ttft_ms"]
    rate_ratio = b["tokens_per_s"] / a["tokens_per_s"]
    print(f"{rounds} interleaved rounds, {MAX_TOKENS} tokens, greedy")
    print_table(rows, ["path", "ttft_ms", "tokens_per_s", "chunks"])
    print(f"\nTTFT overhead: {ttft_ratio:.3f}x ({a['ttft_ms'] - b['ttft_ms']:+.1f} ms); "
          f"throughput overhead: {rate_ratio:.3f}x")
    ok = (ttft_ratio <= 1.05 or a["ttft_ms"] - b["ttft_ms"] <= 20) and rate_ratio <= 1.05
    print(f"target (<= 5 % or <= 20 ms): {'met' if ok else 'NOT met'}")
    save_results("chat_overhead", {"quick": args.quick, "rounds": rounds, "max_tokens": MAX_TOKENS, "sage_ft": a,
                                   "direct": b, "ttft_overhead_ratio": ttft_ratio,
                                   "ttft_overhead_ms": a["ttft_ms"] - b["ttft_ms"],
                                   "throughput_overhead_ratio": rate_ratio, "target_met": ok})
    bar_chart(RESULTS / "chat_overhead.html", "Time to first token (ms)", ["sage-ft", "openai direct"],
              [a["ttft_ms"], b["ttft_ms"]], "ms")
    print(f"results: {RESULTS / 'chat_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
