"""Serving pieces that need no vLLM server: ports, targets, adapter checks, metrics, registry, backends."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from sage_ft.serving import ChatError, ServerManager, TargetError, resolve_target
from sage_ft.serving.chat import build_messages, fit_to_context
from sage_ft.serving.metrics import server_metrics
from sage_ft.serving.ports import find_free_port, is_port_free
from sage_ft.serving.targets import runtime_lora_problems
from tests.fixtures_serving import free_port, make_lora_adapter

ROOT = Path(__file__).resolve().parent.parent
HELLO = [{"role": "user", "content": "Hello"}]


def test_taken_port_is_skipped_for_the_next_free_one():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not is_port_free(port)
        chosen = find_free_port(port)
    assert chosen > port
    assert is_port_free(chosen)


def _write_run(run_dir: Path, base: Path, adapter_src: Path, checkpoints: tuple[int, ...] = ()) -> Path:
    import shutil

    run_dir.mkdir(parents=True)
    (run_dir / "finetune_meta.json").write_text(json.dumps({"base_model": str(base), "status": "completed"}))
    shutil.copytree(adapter_src, run_dir / "lora")
    for step in checkpoints:
        shutil.copytree(adapter_src, run_dir / f"checkpoint-{step}")
    return run_dir


def test_targets_base_run_checkpoint_and_bad_dirs(serving_demo_model, serving_adapters, tmp_path):
    base = resolve_target("demo")
    assert (base.kind, base.path) == ("base", serving_demo_model)
    run = _write_run(tmp_path / "run-1", serving_demo_model, serving_adapters["a"], checkpoints=(10, 20))
    target = resolve_target(str(run))
    assert (target.kind, target.path, target.base_path, target.label) == (
        "adapter", run / "lora", serving_demo_model, "run-1")
    ckpt = resolve_target(str(run / "checkpoint-20"))
    assert (ckpt.kind, ckpt.base_path, ckpt.label) == ("adapter", serving_demo_model, "run-1/checkpoint-20")
    (run / "lora" / "adapter_config.json").unlink()
    latest = resolve_target(str(run))
    assert latest.path == run / "checkpoint-20" and "checkpoint-20" in latest.note
    with pytest.raises(TargetError, match="does not exist|no config.json"):
        resolve_target(str(tmp_path / "missing"))
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(TargetError, match="config.json"):
        resolve_target(str(empty))


def test_runtime_lora_problems_name_each_reason(serving_adapters, tmp_path):
    assert runtime_lora_problems(serving_adapters["a"], 16) == []
    assert "above the server's --max-lora-rank 4" in runtime_lora_problems(serving_adapters["a"], 4)[0]
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((serving_adapters["a"] / "adapter_config.json").read_text())
    cfg.update(use_dora=True, modules_to_save=["lm_head"], target_modules=["q_proj", "embed_tokens"])
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    problems = " | ".join(runtime_lora_problems(bad, 16))
    assert "DoRA" in problems and "modules_to_save" in problems and "embed_tokens" in problems


def test_metrics_parser_reads_vllm_names():
    text = textwrap.dedent("""\
        # HELP vllm:num_requests_running Number of requests in model execution batches.
        vllm:num_requests_running{engine="0",model_name="demo"} 2.0
        vllm:num_requests_waiting{engine="0",model_name="demo"} 1.0
        vllm:kv_cache_usage_perc{engine="0",model_name="demo"} 0.25
        vllm:prompt_tokens_total{engine="0",model_name="demo"} 22.0
        vllm:generation_tokens_total{engine="0",model_name="demo"} 24.0
        vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""} 1.0e+09
        vllm:lora_requests_info{max_lora="4",running_lora_adapters="a1,b2",waiting_lora_adapters=""} 2.0e+09
        """)
    m = server_metrics(text)
    assert (m.requests_running, m.requests_waiting, m.kv_cache_usage) == (2.0, 1.0, 0.25)
    assert (m.prompt_tokens_total, m.generation_tokens_total, m.running_adapters) == (22.0, 24.0, ("a1", "b2"))


def test_chat_messages_are_validated():
    assert build_messages([{"role": "user", "content": "hi"}], "be brief") == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pytest.raises(ChatError, match="no messages"):
        build_messages([])
    with pytest.raises(ChatError, match="message 0"):
        build_messages([{"role": "robot", "content": "x"}])


def test_no_llm_backend_saves_choice_as_restart_needed(serving_demo_model):
    manager = ServerManager("demo", backend="none", install_exit_handlers=False)
    result = manager.switch("demo")
    assert result.outcome == "restart_needed" and result.icon == "⚠️"
    assert result.summary == ("demo is not live yet: saved as the chat model, but no chat server allowed "
                              "(--no-llm, or vLLM missing with the fallback disabled)")
    assert manager.status()["model_label"] == "demo" and manager.status()["backend"] == "none"
    with pytest.raises(ChatError):
        list(manager.stream_chat([{"role": "user", "content": "hi"}]))
    bad = manager.switch("/nonexistent/model")
    assert bad.outcome == "failed" and "does not exist" in bad.message


_FALLBACK_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    if sys.argv[1] == "block-import":
        class _NoVllm(importlib.abc.MetaPathFinder):   # vLLM really cannot be imported in this process
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ModuleNotFoundError("No module named 'vllm'")
        sys.meta_path.insert(0, _NoVllm())
    from sage_ft.serving import ServerManager, stream_chat
    m = ServerManager("demo")
    out = {"backend": m.backend}
    m.start()
    msgs = [{"role": "user", "content": "Hello"}]
    out["base"] = "".join(stream_chat(m, msgs, temperature=0, max_tokens=8))
    r = m.switch(sys.argv[2])
    out["switch"] = [r.outcome, r.mode]
    out["adapter"] = "".join(stream_chat(m, msgs, temperature=0, max_tokens=8))
    out["base_again"] = "".join(stream_chat(m, msgs, model="demo", temperature=0, max_tokens=8))
    out["status"] = m.status()
    m.close()
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.parametrize("how", ["env", "block-import"])
def test_transformers_fallback_when_vllm_is_absent(how, serving_adapters, data_home):
    env = dict(os.environ, SAGE_FT_HOME=str(data_home))
    if how == "env":
        env["SAGE_FT_DISABLE_VLLM"] = "1"
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT, how, str(serving_adapters["a"])],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert out["backend"] == "transformers"
    assert out["status"]["backend"] == "transformers" and "transformers" in out["status"]["backend_reason"]
    assert out["switch"] == ["live", "local"]
    assert out["base"] and out["adapter"] != out["base"]
    assert out["base_again"] == out["base"]


def test_adapter_fixture_changes_weights(serving_adapters, serving_demo_model, tmp_path):
    from safetensors.torch import load_file

    tensors = load_file(str(serving_adapters["b"] / "adapter_model.safetensors"))
    assert tensors and all(t.abs().sum() > 0 for t in tensors.values())
    again = make_lora_adapter(serving_demo_model, tmp_path / "again", seed=2)
    assert (again / "adapter_config.json").exists()


def test_release_for_training_and_restore(serving_adapters):
    manager = ServerManager("demo", backend="transformers", install_exit_handlers=False)
    manager.start()
    assert manager.switch(str(serving_adapters["a"])).outcome == "live"
    before = "".join(manager.stream_chat(HELLO, temperature=0.0, max_tokens=6))
    assert "kept" in manager.release_for_training(estimate_bytes=1)
    message = manager.release_for_training()
    assert "paused" in message and manager.status()["state"] == "released"
    assert manager.status()["message"] == message
    with pytest.raises(ChatError) as info:
        list(manager.stream_chat(HELLO))
    assert info.value.retryable and "paused" in str(info.value)
    assert "back" in manager.restore_after_training()
    status = manager.status()
    assert status["state"] == "ready" and status["model_type"] == "adapter"
    assert "".join(manager.stream_chat(HELLO, temperature=0.0, max_tokens=6)) == before
    assert [m["kind"] for m in manager.chat_models()] == ["base", "adapter"]
    manager.close()
    assert manager.status()["state"] == "stopped"


def test_cancelled_in_process_load_keeps_the_model_that_answered(serving_demo_model, other_base_model):
    """Without vLLM a base switch loads the model in-process; the previous model answers during the load,
    Cancel abandons the load at once: outcome ⏹, the previous model keeps answering the same way, and the
    next switch (not cancelled) goes live."""
    manager = ServerManager("demo", backend="transformers", install_exit_handlers=False, adopt=False)
    states: list[str] = []
    answers_while_loading: list[str] = []

    def cancel_when_loading(item) -> None:  # reported on the switching thread once the load is under way
        if "in-process" in item.stage:
            states.append(manager.status()["state"])
            if manager.current is not None:  # the model that answered goes on answering during the load
                answers_while_loading.append("".join(manager.stream_chat(HELLO, temperature=0.0, max_tokens=6)))
            assert manager.cancel_switch()

    try:
        first = manager.switch(str(serving_demo_model), progress=cancel_when_loading)
        assert first.outcome == "cancelled" and first.icon == "⏹", first.message
        assert "no model is served now; pick a model" in first.message and "stop-then-start" not in first.message
        assert manager.status()["state"] == "stopped" and manager.current is None
        assert manager.status()["model_label"] is None  # the model given up on is not "the chosen one"
        loads_at_once: list[int] = []

        def count_loads(item) -> None:
            if "in-process (transformers)" in item.stage:
                loads_at_once.append(sum(t.name == "sage-ft-local-load" and t.is_alive() for t in threading.enumerate()))

        assert manager.switch(str(serving_demo_model), progress=count_loads).outcome == "live"  # that switch only
        assert loads_at_once == [1]  # the abandoned load had ended before this one began (never two models in RAM)
        before = manager.current
        answer = "".join(manager.stream_chat(HELLO, temperature=0.0, max_tokens=6))

        result = manager.switch(str(other_base_model), progress=cancel_when_loading)
        assert result.outcome == "cancelled", result.message
        assert f"still chatting with {before.label}" in result.message and "in-process was cancelled" in result.message
        assert manager.current == before and manager.status()["state"] == "ready" and not manager.cancel_switch()
        assert states == ["starting", "switching"] and answers_while_loading == [answer]
        assert "".join(manager.stream_chat(HELLO, temperature=0.0, max_tokens=6)) == answer
        # stopped, then restarted (♻️ Restart, or the next chat): the model that answered comes back, not the
        # cancelled one (it did, as the target of the last switch)
        manager.stop()
        assert manager.status()["message"].startswith("stopped; the next chat message")  # not "now chatting …"
        assert manager.restart().outcome == "live" and manager.current.label == before.label
    finally:
        manager.close()


def _long_chat(turns: int, words: int, system: bool = True) -> list[dict[str, str]]:
    chat = [{"role": "system", "content": "Be brief."}] if system else []
    for i in range(turns):
        chat += [{"role": "user", "content": f"question {i} " + "about data " * words},
                 {"role": "assistant", "content": f"answer {i} " + "and more " * words}]
    return chat + [{"role": "user", "content": "and the last question?"}]


def test_fit_to_context_leaves_out_the_oldest_whole_turns_only_as_needed():
    chat = _long_chat(turns=10, words=50)
    lengths: list[int] = []

    def count(messages):  # characters stand in for tokens: the rule, not a tokenizer, is tested here
        lengths.append(len(messages))
        return sum(len(m["content"]) for m in messages)

    assert fit_to_context(chat, count, context=count(chat) + 100, reply_room=100) == (chat, 0)
    lengths.clear()
    fitted, left_out = fit_to_context(chat, count, context=3000, reply_room=200)
    assert fitted[0] == chat[0] and fitted[1]["role"] == "user" and fitted == [chat[0], *chat[1 + 2 * left_out:]]
    assert count(fitted) + 200 <= 3000 < count([chat[0], *chat[1 + 2 * (left_out - 1):]]) + 200  # no more than needed
    assert len(lengths) <= 6  # a binary search over 11 cut points, not one count per turn
    # Only the system prompt and the question fit: that is sent, the reply gets what is left.
    assert fit_to_context(chat, count, context=40, reply_room=30) == ([chat[0], chat[-1]], 10)
    with pytest.raises(ChatError) as too_long:
        fit_to_context(chat, count, context=20, reply_room=10)
    assert str(too_long.value) == ("the message with the system prompt is 31 tokens; the model reads at most 20 "
                                   "(its context length): shorten it") and not too_long.value.retryable


def test_in_process_backend_answers_a_chat_longer_than_the_model_reads(serving_demo_model):
    """The transformers backend has no server to refuse a prompt past the model's positions (2048 for
    the demo model): the chat is measured with its tokenizer and sent without its oldest turns."""
    manager = ServerManager("demo", backend="transformers", install_exit_handlers=False, adopt=False)
    manager.start()
    try:
        chat = _long_chat(turns=12, words=60)
        backend = manager._local
        count, context = backend.count_chat_tokens("demo", chat)
        assert count > context == 2048
        told: list[tuple[int, int]] = []
        reply = "".join(manager.stream_chat(chat, temperature=0.0, max_tokens=4, on_fit=lambda *a: told.append(a)))
        assert reply and len(told) == 1 and told[0][1] == 2048
        kept = [chat[0], *chat[1 + 2 * told[0][0]:]]
        assert backend.count_chat_tokens("demo", kept)[0] + 4 <= 2048
    finally:
        manager.close()


def test_a_server_error_mid_reply_reads_as_a_sentence_with_one_hint():
    """Stopping the server mid-reply gave "❌ chat failed: EngineCore encountered an issue. See stack trace
    (above) for the root cause. Send the message again …" (no stack trace above), and a connection error
    carried two retry hints ("… try again in a few seconds Send the message again in a few seconds.")."""
    import httpx
    import openai

    from sage_ft.serving.chat import _chat_error
    from sage_ft.webui.chat_messages import error_note

    request = httpx.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    engine = _chat_error(openai.APIError("EngineCore encountered an issue. See stack trace (above) for the root "
                                         "cause.", request, body=None), "demo")
    assert str(engine) == ("the chat server ended this reply with an error (EngineCore encountered an issue); if it "
                           "was stopped or restarted, send the message again")
    unreachable = _chat_error(openai.APIConnectionError(request=request), "demo")
    for error in (engine, unreachable):
        note = error_note(error, "en")
        assert note.lower().count("again") == 1 and "Send the message again in a few seconds" not in note, note
    assert error_note(ChatError("the server is busy", retryable=True), "en").endswith(
        "Send the message again in a few seconds.")


def test_a_connection_dropped_mid_stream_is_a_retryable_chat_error():
    """A server that dies while it streams (here: a real socket closed after the first chunk, without
    the chunked encoding's end) raises the HTTP library's own error while the stream is read, which the
    openai client does not wrap; it reads as one sentence, whichever httpx the client uses (openai 3.6x
    moved to httpx2, and our check for httpx's errors let the raw exception through)."""
    from sage_ft.serving.chat import stream_openai

    chunk = 'data: {"id":"x","object":"chat.completion.chunk","created":0,"model":"demo","choices":' \
            '[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve_one_broken_stream() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            body = chunk.encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                         + f"{len(body):x}\r\n".encode() + body + b"\r\n")
            conn.shutdown(socket.SHUT_RDWR)  # gone mid-reply: no terminating chunk

    server = threading.Thread(target=serve_one_broken_stream, daemon=True)
    server.start()
    words: list[str] = []
    try:
        with pytest.raises(ChatError) as caught:
            for piece in stream_openai(f"http://127.0.0.1:{port}/v1", "key", "demo", HELLO, max_tokens=8):
                words.append(piece)
    finally:
        listener.close()
        server.join(timeout=10)
    assert words == ["Hel"]
    assert caught.value.retryable and "stopped answering mid-reply" in str(caught.value), str(caught.value)
