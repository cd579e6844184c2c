"""The shared session vLLM server: verified readiness, chat, runtime LoRA, several adapters, security.

Every test leaves the session manager serving the demo base (other areas reuse ``vllm_manager``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from sage_ft.serving import ChatError, stream_chat
from sage_ft.serving.chat import chat, stream_openai

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def _greedy(manager, model=None, max_tokens=12) -> str:
    return chat(manager, HELLO, model=model, temperature=0.0, max_tokens=max_tokens)


@pytest.fixture
def base_after(vllm_manager):
    yield vllm_manager
    result = vllm_manager.switch("demo")
    assert result.outcome == "live"


def test_start_is_verified_and_status_complete(vllm_manager):
    status = vllm_manager.status()
    assert status["state"] == "ready" and status["backend"] == "vllm"
    assert status["model"] == "demo" and status["model_type"] == "base"
    assert Path(status["log_path"]).is_file() and status["pid"] and status["port"]
    assert status["base_url"] == f"http://127.0.0.1:{status['port']}/v1"
    server = vllm_manager.server
    assert httpx.get(f"{server.root_url}/health", timeout=5).status_code == 200
    models = server.served_models()
    assert models[0]["id"] == "demo" and models[0]["parent"] is None
    # the server is shared by the session: adapters other tests loaded are all children of the base
    assert all(m["parent"] == "demo" for m in models[1:]), models


def test_server_binds_loopback_and_requires_the_api_key(vllm_manager):
    import psutil

    server = vllm_manager.server
    listening = {c.laddr.ip for c in psutil.Process(server.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server.port}
    assert listening == {"127.0.0.1"}
    assert httpx.get(f"{server.base_url}/models", timeout=5).status_code == 401
    no_key = httpx.post(f"{server.base_url}/load_lora_adapter", json={"lora_name": "x", "lora_path": "/etc"},
                        timeout=5)
    assert no_key.status_code == 401
    wrong = httpx.get(f"{server.base_url}/models", headers={"Authorization": "Bearer wrong"}, timeout=5)
    assert wrong.status_code == 401


def test_chat_completion_stream_and_options(vllm_manager):
    chunks = list(stream_chat(vllm_manager, HELLO, system_prompt="You are terse.", temperature=0.0, max_tokens=16))
    assert len(chunks) > 1 and "".join(chunks).strip()
    assert _greedy(vllm_manager) == _greedy(vllm_manager)  # greedy is deterministic
    # max_tokens and stop are honoured by the server
    short = chat(vllm_manager, HELLO, temperature=0.0, max_tokens=2)
    assert len(short) < len(_greedy(vllm_manager, max_tokens=16))
    metrics = vllm_manager.metrics()
    assert metrics["generation_tokens_total"] > 0 and metrics["prompt_tokens_total"] > 0


def test_cancel_event_stops_the_stream(vllm_manager):
    cancel = threading.Event()
    received = []
    for chunk in stream_chat(vllm_manager, HELLO, temperature=0.0, max_tokens=400, cancel_event=cancel):
        received.append(chunk)
        if len(received) == 3:
            cancel.set()
    assert len(received) == 3


def test_unknown_model_is_a_clear_non_retryable_error(vllm_manager):
    with pytest.raises(ChatError) as info:
        _greedy(vllm_manager, model="no-such-adapter")
    assert not info.value.retryable and "not loaded" in str(info.value)


def test_a_chat_longer_than_the_context_is_answered_without_its_oldest_turns(vllm_manager):
    """Past max_model_len (1024 here) vLLM refuses a conversation, and would on every later message
    until the user cleared it: it is sent without its oldest turns instead, as few as leave room for the
    reply by vLLM's own count, and the caller is told (the Chat tab puts it on the reply's label)."""
    server = vllm_manager.server
    conversation = [{"role": "system", "content": "Be brief."}]
    for i in range(8):
        conversation += [{"role": "user", "content": f"question {i} " + "about data " * 40},
                         {"role": "assistant", "content": f"answer {i} " + "and more " * 40}]
    conversation.append({"role": "user", "content": "and the last question?"})
    count, context = server.count_chat_tokens("demo", conversation)
    assert count > context == vllm_manager.max_model_len == 1024
    with pytest.raises(ChatError) as refused:  # what the server says to the whole conversation
        list(stream_openai(server.base_url, server.api_key, "demo", conversation, max_tokens=8))
    assert refused.value.context_overflow and not refused.value.retryable

    told: list[tuple[int, int]] = []
    # answered = accepted and streamed to its end without an error; the text itself may be empty: the
    # random demo model's logits are nearly flat, and greedy can pick its end-of-turn token first (seen once)
    "".join(stream_chat(vllm_manager, conversation, temperature=0.0, max_tokens=16,
                        on_fit=lambda turns, ctx: told.append((turns, ctx))))
    assert len(told) == 1 and told[0][1] == 1024
    left_out = told[0][0]
    assert server.count_chat_tokens("demo", [conversation[0], *conversation[1 + 2 * left_out:]])[0] + 16 <= 1024
    assert server.count_chat_tokens("demo", [conversation[0], *conversation[1 + 2 * (left_out - 1):]])[0] + 16 > 1024
    short = conversation[:1] + conversation[-3:]  # a chat that fits is sent whole, and nobody is told anything
    assert "".join(stream_chat(vllm_manager, short, max_tokens=4, on_fit=lambda *a: told.append(a))) and len(told) == 1

    with pytest.raises(ChatError) as too_long:  # one message past the context: said, never retried in a loop
        list(stream_chat(vllm_manager, [{"role": "user", "content": "word " * 1500}], max_tokens=8))
    assert not too_long.value.retryable and "the model reads at most 1,024" in str(too_long.value)
    assert "shorten it" in str(too_long.value)


def test_a_reply_limit_above_the_context_is_capped_to_it(vllm_manager):
    """Max new tokens at 2,000 while the server reads 1,024 tokens (the Chat tab's slider goes to 2,048):
    vLLM refuses such a request outright, so every message failed until the limit came down; now the
    reply may be as long as the context allows."""
    cancel = threading.Event()
    reply = stream_chat(vllm_manager, [{"role": "user", "content": "Hello"}], max_tokens=2000, cancel_event=cancel)
    try:
        assert next(reply)  # the first words are enough: a whole context's reply takes long on a CPU
    finally:
        cancel.set()
        reply.close()


def test_runtime_lora_changes_outputs_and_is_listed_with_parent(base_after, serving_adapters):
    manager = base_after
    base_answer = _greedy(manager)
    result = manager.switch(str(serving_adapters["a"]))
    assert result.outcome == "live" and result.mode == "runtime-adapter", result.message
    assert result.served.kind == "adapter" and result.served.base_path == manager.server.spec.model_path
    name = result.served.name
    models = {m["id"]: m for m in manager.server.served_models()}
    assert models[name]["parent"] == "demo" and models[name]["root"] == str(serving_adapters["a"])
    assert manager.status()["model"] == name and manager.status()["model_type"] == "adapter"
    assert _greedy(manager) != base_answer
    assert _greedy(manager, model="demo") == base_answer  # the base is still there, by name
    again = manager.switch(str(serving_adapters["a"]))  # idempotent: same name, nothing reloaded
    assert again.outcome == "live" and again.served.name == name and "earlier" in again.message


def test_several_adapters_at_once_answer_differently(base_after, serving_adapters):
    manager = base_after
    names = {key: manager.switch(str(path)).served.name for key, path in serving_adapters.items()}
    assert len(set(names.values())) == 3
    listed = {m["id"] for m in manager.server.served_models()}
    assert set(names.values()) <= listed
    answers = {}
    threads = [threading.Thread(target=lambda k=k, n=n: answers.__setitem__(k, _greedy(manager, model=n)))
               for k, n in names.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(answers) == 3 and len(set(answers.values())) == 3, answers
    assert set(manager.status()["adapters"]) >= set(names.values())


def test_changed_adapter_files_get_a_new_name(base_after, serving_adapters, tmp_path):
    import shutil

    from tests.fixtures_serving import make_lora_adapter

    manager = base_after
    path = tmp_path / "retrained"
    shutil.copytree(serving_adapters["a"], path)
    first = manager.switch(str(path)).served.name
    answer_first = _greedy(manager)
    time.sleep(0.01)
    make_lora_adapter(Path(manager.server.spec.model_path), path, seed=42)
    second = manager.switch(str(path))
    assert second.outcome == "live" and second.served.name != first
    assert first not in manager.status()["adapters"]  # the stale version was unloaded
    assert _greedy(manager) != answer_first


def test_adapter_vllm_refuses_is_a_failed_switch_not_a_crash(base_after, tmp_path):
    bad = tmp_path / "broken-adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    result = base_after.switch(str(bad))
    assert result.outcome == "failed" and result.icon == "❌"
    assert base_after.status()["state"] == "ready"
    assert _greedy(base_after)


def test_chat_cli_uses_the_running_server(vllm_manager, data_home):
    env = dict(os.environ, SAGE_FT_HOME=str(data_home))
    proc = subprocess.run([sys.executable, "-m", "sage_ft", "chat", "--max-tokens", "6", "--temperature", "0"],
                          input="Hello\n/quit\n", env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chatting with demo (vllm)" in proc.stderr
    assert proc.stdout.strip()
    assert vllm_manager.status()["state"] == "ready"  # the client did not stop the owner's server


def test_switch_cli_has_the_app_switch_for_everyone(vllm_manager, data_home, serving_adapters, other_base_model):
    """`sage-ft switch` while another process serves: that process (here this test's manager, in the
    app's place) does the switch, so its Chat tab and every client follow; the same switch again is a
    no-op (a client that loaded the adapter by itself got vLLM's "already loaded" the second time, and
    the app never learnt of the switch)."""
    env = dict(os.environ, SAGE_FT_HOME=str(data_home))
    try:
        for _ in range(2):
            proc = subprocess.run([sys.executable, "-m", "sage_ft", "switch", str(serving_adapters["b"])], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0 and proc.stdout.startswith("✅"), proc.stdout + proc.stderr[-2000:]
            assert vllm_manager.status()["model_label"] == "adapter-b"
        assert "loaded earlier" in proc.stdout
        # another base model: the app starts its server, and the terminal shows that start's progress
        proc = subprocess.run([sys.executable, "-m", "sage_ft", "switch", str(other_base_model)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0 and proc.stdout.startswith("✅"), proc.stdout + proc.stderr[-2000:]
        assert vllm_manager.status()["model_label"] == other_base_model.name
        assert re.search(r"^  \[\s*\d+\.\ds\] ", proc.stderr, re.M), proc.stderr[-2000:]  # "  [ 12.3s] <stage>"
    finally:
        assert vllm_manager.switch("demo").outcome == "live"


def test_chat_cli_follows_a_switch_the_app_makes(vllm_manager, data_home, serving_adapters):
    """The web app switches the chat model while `sage-ft chat` runs: the next message is answered by
    the new model, and the terminal says so."""
    env = dict(os.environ, SAGE_FT_HOME=str(data_home))
    proc = subprocess.Popen([sys.executable, "-m", "sage_ft", "chat", "--max-tokens", "6", "--temperature", "0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        line = ""
        for line in iter(proc.stderr.readline, ""):
            if "chatting with" in line:
                break
        assert "chatting with demo" in line
        assert vllm_manager.switch(str(serving_adapters["a"])).outcome == "live"  # the app's Chat tab
        out, err = proc.communicate("Hello\n/quit\n", timeout=120)
    finally:
        proc.kill()
        assert vllm_manager.switch("demo").outcome == "live"
    assert proc.returncode == 0, err[-2000:]
    assert "the app now serves adapter-a; it answers from here on" in err and out.strip()
