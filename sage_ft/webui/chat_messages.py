"""The messages of the Chat tab: how a reply is written while it streams and what the model is sent.

A reply starts with the name of the model that wrote it (``answered_by``), so a conversation that
spans a switch stays readable; ``prompt_of`` sends the model the turns without those names, without
our error notes and without the "stopped" marks. ``Pump`` runs one streaming reply in a thread so the
UI never blocks on the server; ``Reply`` assembles what it drains into the Chatbot message.
``RUNNING`` knows which replies stream now: one per chat of a page at most (Send, Enter and
Regenerate are separate events, so a second one could otherwise stream into the same chat).
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from sage_ft.webui import i18n

log = logging.getLogger(__name__)

ERROR_MARK = "❌"
STOPPED_MARK = "⏹"
WRITING_MARK = "✍️"  # a restored reply that another tab of the browser is still writing
NOTE_MARKS = (STOPPED_MARK, WRITING_MARK)  # our notes under a reply, never sent to the model
MODEL_MARK = "🤖"  # starts a reply's first line: the model that wrote it


def text_of(content: Any) -> str:
    """Chatbot message content (a string, or Gradio 6's list of text parts) as plain text."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text") or content.get("content") or "")
    if isinstance(content, (list, tuple)):
        return "".join(text_of(c) for c in content)
    return "" if content is None else str(content)


def as_messages(history: list[Any] | None) -> list[dict[str, str]]:
    """The chat as ``{"role", "content"}`` dicts (whatever shape the Chatbot sent)."""
    out = []
    for msg in history or []:
        role = msg.get("role") if isinstance(msg, dict) else getattr(msg, "role", None)
        content = msg.get("content") if isinstance(msg, dict) else getattr(msg, "content", "")
        if role in ("user", "assistant", "system"):
            out.append({"role": role, "content": text_of(content)})
    return out


def answered_by(label: str, note: str = "") -> str:
    """A reply's first line: which model wrote it, so replies stay attributed after a switch (and a
    ``note`` on how it was asked, e.g. that the oldest turns were left out to fit its context).
    ``render.JS`` recognises this exact form to leave it out of a copied reply."""
    return f"<sub>{MODEL_MARK} {md_escape(label)}{' · ' + md_escape(note) if note else ''}</sub>\n\n"


def without_label(content: str) -> str:
    """A reply as the model wrote it (``answered_by``'s line removed)."""
    end = content.find("</sub>\n\n") if content.startswith(f"<sub>{MODEL_MARK} ") else -1
    return content[end + len("</sub>\n\n"):] if end >= 0 else content


def prompt_of(history: list[dict[str, str]]) -> list[dict[str, str]]:
    """What the model sees: the turns without our labels and error notes (and the question that failed,
    or that was never answered: a page reloaded while its reply streamed keeps the question alone)."""
    out: list[dict[str, str]] = []
    for msg in history:
        content = msg["content"]
        if msg["role"] == "user" and out and out[-1]["role"] == "user":
            out.pop()
        if msg["role"] == "assistant":
            content = without_label(content)
            if content.lstrip().startswith(ERROR_MARK):
                if out and out[-1]["role"] == "user":
                    out.pop()
                continue
            content = re.split("|".join(f"\n\n{re.escape(mark)}" for mark in NOTE_MARKS), content)[0]
        out.append({"role": msg["role"], "content": content})
    return out


class Reply:
    """The assistant message being written: the label line of the model that answers, then its text."""

    def __init__(self, message: dict[str, str]):
        self.message, self.label, self.body = message, "", ""
        self.model, self.note = "", ""
        self.starting: str | None = None  # the chat server's start under way before the reply (its stage)
        self.starting_since = 0.0

    def add(self, got: Drained, lang: str) -> bool:
        """Take what a pump drained; whether the message changed (a server start under way, shown until
        the first words come, changes it each second: its elapsed time)."""
        if got.starting is not None:
            if self.starting is None:
                self.starting_since = time.monotonic()
            self.starting = got.starting
        if got.left_out:
            turns, context = got.left_out
            self.note = i18n.t("chat.left_out", lang, n=turns, context=f"{context:,}")
        if got.model or got.left_out:
            self.model = got.model or self.model
            self.label = answered_by(self.model, self.note)
        self.body += got.text
        if got.error is not None:
            self.body = (self.body + "\n\n" if self.body else "") + error_note(got.error, lang)
        if got.done and not self.body:
            self.body = f"_{i18n.t('chat.empty_reply', lang)}_"
        return self._show(lang) or bool(got.done)

    def _starting_note(self, lang: str) -> str:
        if self.starting is None:
            return ""
        seconds = f"{time.monotonic() - self.starting_since:.0f}"
        stage = f"{self.starting} · " if self.starting else ""
        return f"⏳ _{md_escape(i18n.t('chat.server_starting', lang))} ({md_escape(stage)}{seconds} s)_"

    def stopped(self, lang: str) -> None:
        self.body += f"\n\n{STOPPED_MARK} {i18n.t('chat.stopped', lang)}"
        self._show()

    def fail(self, text: str) -> None:
        self.body = text
        self._show()

    def _show(self, lang: str = "en") -> bool:
        content = self.label + (self.body or self._starting_note(lang))
        changed = content != self.message["content"]
        self.message["content"] = content
        return changed


class Drained(NamedTuple):
    """What one ``Pump.drain`` found (all empty when nothing came within its timeout)."""

    text: str = ""
    done: bool = False
    error: Exception | None = None
    model: str | None = None  # the label of the model that answers, once the request is routed
    left_out: tuple[int, int] | None = None  # (oldest turns not sent, context length) of a long chat
    starting: str | None = None  # the chat server is being started first: its stage ("" before the first)


# ("model", label), ("fit", (turns left out, context length)) or ("starting", stage of a server start)
Report = Callable[[str, Any], None]


class Pump:
    """Runs one streaming reply in a thread; the UI drains ``chunks`` and never blocks on the server.
    ``start(report)`` begins the stream (``stream_chat`` with ``on_route``/``on_fit`` calling ``report``)."""

    def __init__(self, start: Callable[[Report], Iterator[str]]):
        self.chunks: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._run, args=(start,), name="sage-ft-chat-stream", daemon=True)
        self.thread.start()

    def _run(self, start: Callable[[Report], Iterator[str]]) -> None:
        try:
            for chunk in start(lambda kind, value: self.chunks.put((kind, value))):
                self.chunks.put(("text", chunk))
            self.chunks.put(("end", None))
        except Exception as exc:  # ChatError and anything else: shown in the chat
            if type(exc).__name__ != "ChatError":
                log.exception("chat stream failed")
            self.chunks.put(("error", exc))

    def drain(self, timeout: float) -> Drained:
        """New text, whether the reply ended, its error and model (waits up to ``timeout`` for something)."""
        text, done, error, model, left_out, starting = "", False, None, None, None, None
        try:
            items = [self.chunks.get(timeout=timeout)]
        except queue.Empty:
            return Drained()
        while True:
            try:
                items.append(self.chunks.get_nowait())
            except queue.Empty:
                break
        for kind, value in items:
            if kind == "text":
                text += value
            elif kind == "model":
                model = value
            elif kind == "fit":
                left_out = value
            elif kind == "starting":
                starting = value
            else:
                done, error = True, value if kind == "error" else None
        return Drained(text, done, error, model, left_out, starting)


def error_note(exc: Exception, lang: str) -> str:
    """The chat's error line; the retry hint only where the message does not say to try again already
    (it read "… try again in a few seconds Send the message again in a few seconds.")."""
    text = str(exc)
    said = "again" in text.lower()
    retry = f" {i18n.t('chat.retry_hint', lang)}" if getattr(exc, "retryable", False) and not said else ""
    return f"{ERROR_MARK} {text}{retry}"


def md_escape(text: str) -> str:
    """A model's name as literal text inside a chat message (run names may hold ``_``, ``*``, ``<``)."""
    return re.sub(r"([\\`*_\[\]<>#|~])", r"\\\1", text)


def reply_key(session_hash: str | None, where: str = "chat") -> str:
    """Whose reply: the page's session (API callers without one share "api"), + "/compare" for the
    reply of its Compare sub-tab ("chat" or "compare": each is a chat of its own)."""
    return f"{session_hash or 'api'}{'/compare' if where == 'compare' else ''}"


class RunningReplies:
    """The replies streaming now, by ``reply_key``, each with the event that stops it. A chat has one
    at most: ``claim`` refuses a second (it streamed into the same chat, and Stop reached only the
    newest). Thread-safe: Gradio runs each event's handler on a thread of its own."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._cancels: dict[str, threading.Event] = {}

    def claim(self, key: str) -> threading.Event | None:
        """The cancel event of a new reply of ``key``, or None while one streams there."""
        with self._changed:
            if key in self._cancels:
                return None
            event = self._cancels[key] = threading.Event()
            return event

    def release(self, key: str, event: threading.Event) -> None:
        """The reply of ``event`` ended (or was refused, stopped, or its page went away)."""
        with self._changed:
            if self._cancels.get(key) is event:
                del self._cancels[key]
                self._changed.notify_all()

    def streaming(self, key: str) -> bool:
        return key in self._cancels

    def __len__(self) -> int:
        """How many replies stream now (in every page)."""
        return len(self._cancels)

    def stop(self, key: str, clearing: bool = False) -> bool:
        """Ask the reply of ``key`` to stop (``clearing``: end it without a last update, the chat is
        emptied next); whether one was streaming."""
        with self._changed:
            event = self._cancels.get(key)
            if event is not None:
                event.clearing = clearing  # type: ignore[attr-defined]
                event.set()
            return event is not None

    def wait_ended(self, key: str, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until no reply of ``key`` streams; whether none does."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while key in self._cancels:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
            return True


RUNNING = RunningReplies()  # the replies of every page of this app process
