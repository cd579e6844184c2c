"""The Chat tab's state across events, pages and server starts, on the session's real vLLM server:
one reply streams in a chat at a time (Send, Enter and Regenerate are separate Gradio events, and a
second one streamed into the same chat), warning toasts go away, a page opened while another tab's
reply streams does not call that reply cut off, and the server panel and the chat follow a server
that was stopped and is started again by the next message.

The page's events are sent as the page sends them: Gradio's queue protocol (join + one event stream
per page session), so that two events of one page run at once, as clicks in a browser do, and the
toasts (Gradio's "log" messages, with their duration) can be read.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest
from gradio_client.utils import apply_diff

from sage_ft.webui import chat_memory, chat_tab
from sage_ft.webui.chat_memory import remember_partial, restore_chats
from sage_ft.webui.chat_messages import RUNNING, prompt_of, reply_key
from tests.fixtures_serving import server_held
from tests.fixtures_webui import start_webui

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

LONG = ("", 0.0, 1.0, 900, "en")  # greedy, 900 tokens: the demo model's greedy reply runs to the limit (2-20 s)
SHORT = ("", 0.0, 1.0, 12, "en")


def _held_mid_reply(page: Page, event: str, let_run) -> list[Any] | None:
    """The latest output of ``event`` once its reply is held mid-way: the held server let run in short
    bursts until the page shows a few words, then nothing more for 1 s (what the server wrote before it
    was held has reached the page) and the reply still under way. None when the reply ended instead:
    now and then (CI; 2 runs in 38 here) the bursts let the server write the whole reply before the page
    showed any of it, and a reply read whole ends while the server is held (the test then sent its
    second message to a free chat, which answered it). The callers try again; a reply that always ends
    (an error, another model) still fails them."""
    deadline = time.monotonic() + 120
    while not any(_replying(output) for output in list(page.outputs[event])):
        if event in page.done:
            return None
        assert time.monotonic() < deadline, f"no words of the reply within 120 s: {page.outputs[event][-1:]}"
        let_run(0.05)
        # what the burst wrote reaches the page: up to 2 s before the next burst (with a fixed 0.3 s, a page
        # that lagged on a busy machine let the bursts write the whole 900-token reply first, seen twice in CI)
        burst_seen = time.monotonic() + 2.0
        while time.monotonic() < burst_seen and not any(_replying(out) for out in list(page.outputs[event])):
            time.sleep(0.05)
    settled_by = time.monotonic() + 30
    count, since = len(page.outputs[event]), time.monotonic()
    while time.monotonic() - since < 1.0:
        if event in page.done:
            return None
        assert time.monotonic() < settled_by, "the reply kept growing for 30 s with the server held"
        if len(page.outputs[event]) != count:
            count, since = len(page.outputs[event]), time.monotonic()
        time.sleep(0.05)
    if event in page.done or not RUNNING.streaming(reply_key(page.session)):
        return None
    return page.outputs[event][-1]


def _reply_held_mid_way(page: Page, let_run, api_name: str, *data: Any) -> tuple[str, list[Any]]:
    """``api_name``'s reply sent and held mid-way (``_held_mid_reply``): its event and latest output,
    sent again (up to three times) when it ended first."""
    for _ in range(3):
        event = page.send(api_name, *data)
        shown = _held_mid_reply(page, event, let_run)
        if shown is not None:
            return event, shown
        page.result(event, timeout=60)
    raise AssertionError(f"three replies ended before they could be held mid-way: {page.state(event)}")


@pytest.fixture(scope="module")
def chat_app(vllm_manager, tmp_path_factory):
    app = start_webui(tmp_path_factory.mktemp("webui_chat_state"), start_worker=False, server=vllm_manager)
    yield app
    app.close()
    if vllm_manager.status()["state"] != "ready" or vllm_manager.status()["model"] != "demo":
        assert vllm_manager.switch("demo").outcome == "live"


class Page:
    """One browser page: its session, its events sent as the page's script sends them, and what each
    event sent back (outputs as they streamed, toasts)."""

    def __init__(self, app: Any):
        self.app = app
        self.url = app.url.rstrip("/")
        self.session = uuid.uuid4().hex
        self.fns = {d["api_name"]: d["id"] for d in app.demo.config["dependencies"] if d.get("api_name")}
        self.outputs: dict[str, list[list[Any]]] = defaultdict(list)  # event id -> each output, whole
        self.toasts: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.done: dict[str, dict[str, Any]] = {}
        self._sent: set[str] = set()
        self.names: dict[str, str] = {}  # event id -> "api_name#n", n-th sent (for failure messages)
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    def send(self, api_name: str, *data: Any) -> str:
        """Join the queue with ``api_name``'s event; its id (read what it sends with ``result``)."""
        body = {"data": list(data), "fn_index": self.fns[api_name], "session_hash": self.session,
                "event_data": None, "trigger_id": None}
        with self._lock:
            event = httpx.post(f"{self.url}/gradio_api/queue/join", json=body, timeout=30).json()["event_id"]
            self._sent.add(event)
            self.names[event] = f"{api_name}#{len(self.names) + 1}"
            if self._reader is None:  # the server ends the page's stream once no event of it is left
                self._reader = threading.Thread(target=self._read, daemon=True)
                self._reader.start()
        return event

    def _read(self) -> None:
        while True:
            self._read_stream()
            with self._lock:  # an event sent as the stream closed is read from a new one
                if self._sent <= set(self.done):
                    self._reader = None
                    return

    def _read_stream(self) -> None:
        with httpx.stream("GET", f"{self.url}/gradio_api/queue/data", params={"session_hash": self.session},
                          timeout=httpx.Timeout(30, read=120)) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                event = msg.get("event_id")
                if msg["msg"] == "log":
                    self.toasts[event].append(msg)
                elif msg["msg"] in ("process_generating", "process_completed") and msg.get("success", True):
                    data = msg["output"]["data"]
                    if msg["msg"] == "process_generating" and self.outputs[event]:  # a diff of the last one
                        data = [apply_diff(old, diff) for old, diff in zip(self.outputs[event][-1], data, strict=True)]
                    self.outputs[event].append(data)
                if msg["msg"] == "process_completed":
                    self.done[event] = msg
                if msg["msg"] == "close_stream":
                    return

    def result(self, event: str, timeout: float = 180) -> list[Any]:
        deadline = time.monotonic() + timeout
        while event not in self.done:
            assert time.monotonic() < deadline, f"event {event} did not end within {timeout} s: {self.state(event)}"
            time.sleep(0.05)
        assert self.done[event].get("success", True), self.done[event]
        return self.done[event]["output"]["data"]

    def state(self, event: str) -> str:
        """For a failure message: what the event sent, what the app's queue holds, this page's reader,
        what each of its events showed last and the server's state (it showed why a refusal expected at
        once did not end: the reply before it had ended, so the message was answered)."""
        queue = self.app.demo._queue  # private: read only to say what happened
        active = [e.fn.api_name or e.fn.name for jobs in queue.active_jobs if jobs for e in jobs]
        waiting = {cid: [e.fn.api_name or e.fn.name for e in q.queue]
                   for cid, q in queue.event_queue_per_concurrency_id.items() if q.queue}
        reader = self._reader is not None and self._reader.is_alive()
        last_words = {self.names.get(e, e): (e in self.done, _text(out[-1][0][-1])[-200:] if out and out[-1][0]
                                                 else None) for e, out in self.outputs.items()}
        return (f"its outputs {self.outputs[event][-2:]}, toasts {self.toasts[event]}; the queue: in process "
                f"{active} ({queue.active_jobs.count(None)} free), waiting {waiting}; this page: sent "
                f"{len(self._sent)}, done {len(self.done)}, reader alive {reader}; each event's (done, last "
                f"words) {last_words}; replies streaming {sorted(RUNNING._cancels)}; server "
                f"{self.app.services.server.status()}")

    def wait_for(self, event: str, check, timeout: float = 120) -> list[Any]:
        """The first output of ``event`` for which ``check(output)`` holds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for output in list(self.outputs[event]):
                if check(output):
                    return output
            assert event not in self.done or any(check(o) for o in self.outputs[event]), self.outputs[event][-1:]
            time.sleep(0.05)
        raise AssertionError(f"no such output of {event} within {timeout} s: {self.outputs[event][-1:]}")


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def _words(history: list[dict[str, Any]]) -> str:
    """The last reply without its "🤖 model" line."""
    return _text(history[-1]).partition("</sub>\n\n")[2] if history else ""


def _replying(output: list[Any]) -> bool:
    """The reply has begun: a dozen characters of it, not a count of words (the demo model's random
    weights may write a long run without a space; it once ran to the end of the reply, seen in CI)."""
    chat = output[0]
    return bool(chat) and chat[-1]["role"] == "assistant" and len(_words(chat).strip()) >= 12


def test_one_reply_streams_in_a_chat_at_a_time(chat_app):
    """Regenerate, then Send while the regenerated reply streams (the tester's repro): the chat
    flickered between two replies streaming into it, and the question sent second was lost; Stop
    stopped only the newest. Now the second is refused with a short note, its question stays in the
    message box, the reply streaming goes on alone, and Stop stops it."""
    page = Page(chat_app)
    first = page.result(page.send("chat_send", "Q1", [], *SHORT))[0]
    assert [m["role"] for m in first] == ["user", "assistant"]
    with server_held(chat_app.services.server) as let_run:
        regen, _ = _reply_held_mid_way(page, let_run, "chat_regenerate", first, *LONG)
        sent = page.send("chat_send", "Q2", first, *LONG)
        again = page.send("chat_regenerate", first, *LONG)
        for refused in (sent, again):
            page.result(refused, timeout=30)  # at once, while the first streams on
            assert not page.outputs[refused] or all(out[0] is None or out[0] == {"__type__": "update"}
                                                    for out in page.outputs[refused]), page.outputs[refused]
            toast = [t for t in page.toasts[refused] if t["level"] == "warning"]
            assert toast and "still being written in this chat" in toast[0]["log"] and toast[0]["duration"], toast
        # the message box keeps Q2 (not emptied as a sent message is)
        assert page.outputs[sent] == [] or all(out[1] in (None, {"__type__": "update"}) for out in page.outputs[sent])
        assert regen not in page.done
        page.result(page.send("chat_stop"), timeout=30)
        final = page.result(regen, timeout=60)[0]
    assert [_text(m) for m in final if m["role"] == "user"] == ["Q1"] and len(final) == 2
    assert _text(final[-1]).endswith("⏹ stopped"), _text(final[-1])[-200:]
    # every output of the regenerated reply was that one reply: never Q2, never another answer's start
    starts = {" ".join(_words(out[0]).split())[:20] for out in page.outputs[regen]  # (as test_webui_chat's
              if out[0] and len(" ".join(_words(out[0]).split())) >= 20}                # _same_answer reads them)
    assert len(starts) == 1, starts
    # the chat is free again: Q2 can now be sent
    after = page.result(page.send("chat_send", "Q2", final, *SHORT))[0]
    assert [_text(m) for m in after if m["role"] == "user"] == ["Q1", "Q2"] and _words(after)
    # the page sends a Send or Regenerate made while a reply streams (Gradio's default drops a click on
    # an event still running, without a word), so that it is told why nothing happens
    deps = [d for d in chat_app.demo.config["dependencies"]
            if d.get("api_name") in ("chat_send", "chat_regenerate", "chat_compare")]
    assert len(deps) == 3 and {d["trigger_mode"] for d in deps} == {"multiple"}


def test_one_comparison_at_a_time_and_a_chat_beside_it(chat_app):
    """Compare is a chat of its own: a second Compare while one streams is refused; the Chat sub-tab
    answers meanwhile."""
    page = Page(chat_app)
    with server_held(chat_app.services.server):  # (two greedy replies ran to their end in ~2 s when idle)
        comparing = page.send("chat_compare", "Tell me a story", [], [], "demo", "demo", *LONG)
        deadline = time.monotonic() + 60
        while not RUNNING.streaming(reply_key(page.session, "compare")):
            assert time.monotonic() < deadline, "the comparison never started"
            time.sleep(0.05)
        second = page.send("chat_compare", "Another", [], [], "demo", "demo", *LONG)
        page.result(second, timeout=30)
        assert any("still being written" in t["log"] for t in page.toasts[second])
        chatting = page.send("chat_send", "Hi", [], *SHORT)  # the Chat sub-tab is not blocked: no note
        page.result(page.send("chat_compare_stop"), timeout=30)
        a, b, status = page.result(comparing, timeout=60)[:3]
    assert status.startswith("⏹") and [_text(m) for m in a if m["role"] == "user"] == ["Tell me a story"]
    chat = page.result(chatting, timeout=60)[0]  # it answers once the server goes on
    assert _words(chat) and not [t for t in page.toasts[chatting] if t["level"] == "warning"]


def test_warning_toasts_go_away(chat_app, tmp_path):
    """A failed switch's warning stayed (duration None) and covered the Switch and Cancel switch
    buttons; its status line says it already. Toasts now go after a few seconds."""
    page = Page(chat_app)
    event = page.send("chat_switch", str(tmp_path / "no-such-model"), "en")
    status = page.result(event)[0]
    assert status.startswith("❌")
    warnings = [t for t in page.toasts[event] if t["level"] == "warning"]
    assert warnings and all(t["duration"] and 0 < t["duration"] <= 10 for t in warnings), warnings


def test_a_page_opened_while_another_tab_streams_does_not_call_that_reply_cut_off(chat_app):
    """The browser keeps a streaming reply with the page that streams it; a page loaded while that
    page still streams says it is still being written in another tab (it said "cut off: the page was
    reloaded", though nothing was reloaded). Once that reply has ended (a reload ends it), the same
    save reads as cut off. Neither note is sent to the model."""
    page = Page(chat_app)
    with server_held(chat_app.services.server) as let_run:
        replying, shown = _reply_held_mid_way(page, let_run, "chat_send", "Tell me a story", [], *LONG)
        shown = shown[0]
        # what this page's autosave keeps (the autosave timer's handler, as the page's tick calls it)
        saved, _ = remember_partial(chat_tab.streaming_in)(shown, [], [], gr.Request(session_hash=page.session))
        assert saved["streaming"] == ["chat"] and saved["page"] == page.session
        chat = restore_chats(saved, None, "en")[0]  # another page loads meanwhile
        assert chat[-1]["content"].endswith("✍️ still being written in another tab of this browser: these are its "
                                            "words saved so far (reload to see more)"), chat[-1]["content"][-300:]
        assert "cut off" not in chat[-1]["content"]
        assert prompt_of(chat)[-1]["content"] == _words(shown)  # the note is not sent
        page.result(page.send("chat_stop"), timeout=30)
        page.result(replying, timeout=60)
    assert RUNNING.wait_ended(reply_key(page.session), 10)
    chat = restore_chats(saved, None, "en")[0]
    assert chat[-1]["content"].endswith("⏹ cut off: the page was reloaded while this reply was written")


def test_a_reply_of_a_page_reloaded_mid_way_is_waited_for_before_it_is_called_cut_off():
    """A reload: the page left still streams for a moment (Gradio ends its reply on the next streamed
    words), so the page loaded waits for it rather than say it is written in another tab."""
    key = reply_key("left-page")
    cancel = RUNNING.claim(key)
    assert cancel is not None and RUNNING.claim(key) is None  # one reply per chat
    threading.Timer(0.5, RUNNING.release, (key, cancel)).start()
    saved = {"chat": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Once"}],
             "streaming": ["chat"], "page": "left-page"}
    started = time.monotonic()
    chat = restore_chats(saved, None, "en")[0]
    assert chat[-1]["content"].endswith("cut off: the page was reloaded while this reply was written")
    assert time.monotonic() - started < chat_memory.RESTORE_WAIT_S + 5


def test_a_stopped_server_is_started_by_the_next_message_and_the_panel_follows(chat_app, vllm_manager):
    """⏹ Stop server, then a message: the reply said nothing for the ~40 s the server took to start,
    the panel kept saying "stopped … press Restart", and its log tail was empty while the server
    started. Now the reply says the server is starting (with its stage), the log tail shows the start
    log as it grows, and the stopped line goes once the server runs again."""
    client = chat_app.client()
    stopped = client.predict("en", api_name="/server_stop")
    assert "stopped" in stopped and vllm_manager.status()["state"] == "stopped"
    message = client.predict("en", api_name="/server_status")[3]
    assert "stopped" in message, message  # the line still tells of the state it was written for
    job = client.submit("Hello", [], *SHORT, api_name="/chat_send")
    tails, messages, polled = [], [], []  # (messages: of polls while it started; polled: of all)
    while not job.done():
        state = vllm_manager.status()["state"]
        tail, message = client.predict("en", api_name="/server_status")[2:]
        polled.append(message)
        if state == "starting":
            tails.append(tail)
            messages.append(message)
        time.sleep(1.0)
    history = job.result()[0]
    assert vllm_manager.status()["state"] == "ready"
    start_log = Path(vllm_manager.status()["log_path"]).read_text(errors="replace")
    assert any(t.strip() for t in tails), "the log tail was empty while the server started"
    assert all(line in start_log for t in tails for line in t.splitlines()[-3:])
    # not "⏹ stopped … press Restart": cleared once (by the poll that saw the start begin, which may have
    # read the state as stopped here), then left as it is
    assert "" in polled and all(m in ("", {"__type__": "update"}) for m in polled[polled.index(""):]), polled
    assert all(m in ("", {"__type__": "update"}) for m in messages), messages
    notes = [h[-1]["content"] for h, _ in job.outputs() if h and h[-1]["role"] == "assistant"]
    notes = [n if isinstance(n, str) else _text({"content": n}) for n in notes]
    assert any("The chat server is not running: starting it first" in n for n in notes), notes[:5]
    assert _words(history) and "starting it first" not in _text(history[-1])
