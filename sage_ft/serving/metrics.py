"""Reading vLLM's ``/metrics`` (Prometheus text format) into the few numbers the UI shows."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample as ``(name, labels, value)``; comments and malformed lines are skipped."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        samples.append((match["name"], labels, value))
    return samples


@dataclass
class ServerMetrics:
    """What the server is doing now and has done since start (summed over engines/models)."""

    requests_running: float = 0.0
    requests_waiting: float = 0.0
    kv_cache_usage: float = 0.0  # fraction 0..1
    prompt_tokens_total: float = 0.0
    generation_tokens_total: float = 0.0
    running_adapters: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


_SUMMED = {
    "vllm:num_requests_running": "requests_running",
    "vllm:num_requests_waiting": "requests_waiting",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
}


def server_metrics(text: str) -> ServerMetrics:
    """Pick the serving figures out of a ``/metrics`` page."""
    result = ServerMetrics()
    latest_lora: tuple[float, str] = (-math.inf, "")
    for name, labels, value in parse_prometheus(text):
        if name in _SUMMED:
            setattr(result, _SUMMED[name], getattr(result, _SUMMED[name]) + value)
        elif name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
            result.kv_cache_usage = max(result.kv_cache_usage, value)
        elif name == "vllm:lora_requests_info" and value > latest_lora[0]:
            latest_lora = (value, labels.get("running_lora_adapters", ""))
    result.running_adapters = tuple(a for a in latest_lora[1].split(",") if a)
    return result
