"""The Chat tab's conversations and generation settings, kept in the browser.

A refresh, a closed tab or an app restart loses neither (other studios lose chat history on refresh).
Kept like the Train form's draft (``form_memory``): per browser, in its localStorage, encrypted with
the data home's key. Conversations are saved once a reply is complete, a question as soon as it is
sent, and a reply every ``AUTOSAVE_S`` while it streams: a page reloaded mid-reply shows the question
and what the reply had said, marked as cut off (Regenerate answers again); a page opened while another
tab's reply streams shows its words so far, marked as still being written there (the saves name the
page whose reply streamed, and the app knows which replies stream). Settings are saved when
one is set, and only then. The two are kept apart: every tab of a browser shares that storage, and a
page opened earlier holds the conversations as they were then, so setting a slider there must not
write those back over what another tab said since; nor may a reply ending in one tab write its
settings over those just set in another.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from sage_ft.webui import form_memory, i18n
from sage_ft.webui.chat_messages import RUNNING, STOPPED_MARK, WRITING_MARK, as_messages, reply_key
from sage_ft.webui.components import Registry

STORAGE_KEY = "sage-ft-chats"
SETTINGS_KEY = "sage-ft-chat-settings"
# What the browser keeps of each conversation (characters, newest turns kept): localStorage holds about
# 5 MB per site, and the Train form's draft lives there too.
SAVED_CHARS = {"chat": 300_000, "a": 100_000, "b": 100_000, "system": 20_000}
# The generation sliders: (minimum, maximum, default, step).
SLIDERS = {"temperature": (0.0, 2.0, 0.7, 0.05), "top_p": (0.05, 1.0, 1.0, 0.05), "max_tokens": (1, 2048, 256, 1)}
# How often a streaming reply is saved (seconds): a reload loses at most this much of it. Each save
# sends the page's conversations to the server and back, so not for every streamed word.
AUTOSAVE_S = 2.0
# How long a page being loaded waits for the reply it restores to end, when the page that streamed it
# still does (seconds): after a reload the reply of the page left ends a moment later (Gradio closes
# it on the next streamed words), while that of another tab streams on.
RESTORE_WAIT_S = 3.0
# The components restored on page load, in ``restore_chats``'s order (``chat.<name>`` in the registry).
RESTORED = ("chatbot", "compare_a", "compare_b", "system", *SLIDERS)


def build_state(reg: Registry) -> None:
    """The browser states ``chat.saved`` (conversations) and ``chat.settings_saved``, and the
    ``chat.autosave`` timer that runs while a reply streams. Built outside the tabs: a browser state
    inside a tab not yet opened is not mounted when the page loads, so it would read as empty."""
    secret = form_memory.browser_secret()
    reg.add("chat.saved", gr.BrowserState(None, storage_key=STORAGE_KEY, secret=secret), kind="none")
    reg.add("chat.settings_saved", gr.BrowserState(None, storage_key=SETTINGS_KEY, secret=secret), kind="none")
    reg.add("chat.autosave", gr.Timer(AUTOSAVE_S, active=False), kind="none")


def remember_chats(chat: list[Any] | None, side_a: list[Any] | None, side_b: list[Any] | None) -> dict[str, Any]:
    """What this browser keeps of its conversations (Chat and both Compare sides), so a refresh or an
    app restart loses none; each is cut to its newest turns within ``SAVED_CHARS``."""
    return {key: newest_turns(as_messages(turns), SAVED_CHARS[key])
            for key, turns in (("chat", chat), ("a", side_a), ("b", side_b))}


def remember_settings(system: str | None, temperature: float, top_p: float, max_tokens: float) -> dict[str, Any]:
    """What this browser keeps of the generation settings."""
    return {"system": str(system or "")[:SAVED_CHARS["system"]], "temperature": temperature, "top_p": top_p,
            "max_tokens": max_tokens}


Streaming = Callable[[str | None], tuple[str, ...]]  # a page's session -> where its replies stream now


def remember_question(where: str, streaming: Streaming) -> Callable[..., Any]:
    """The handler a Send runs just before its reply (``where``: "chat", or "compare" for both Compare
    sides): the conversations ``remember_chats`` keeps, with the question just sent added to that one,
    and the autosave timer started. The reply streams for seconds; a reload before its first autosave
    would lose the question too. While a reply streams there (``streaming``), the Send is refused and
    its question stays in the message box: nothing is kept."""
    def keep(message: str | None, chat: list[Any] | None, side_a: list[Any] | None,
             side_b: list[Any] | None, request: gr.Request) -> Any:
        if not (message or "").strip() or where in streaming(getattr(request, "session_hash", None)):
            return gr.skip(), gr.skip()
        asked = [{"role": "user", "content": message}]
        if where == "chat":
            chat = [*as_messages(chat), *asked]
        else:
            side_a, side_b = [*as_messages(side_a), *asked], [*as_messages(side_b), *asked]
        return remember_chats(chat, side_a, side_b), gr.Timer(active=True)
    return keep


def remember_partial(streaming: Streaming) -> Callable[..., Any]:
    """The autosave timer's handler: the conversations as the page shows them now, the replies still
    streaming included, with ``"streaming"`` naming where ("chat", "compare") and ``"page"`` the page
    (its session) that streams them, so that a page restored from them marks those replies as cut off,
    or as still being written where that page still streams them. ``streaming(session_hash)`` says
    where this page's replies stream; once none does, the timer stops and saves nothing (the complete exchange is saved
    when its reply ends, and a late tick must not write an older state over it)."""
    def keep(chat: list[Any] | None, side_a: list[Any] | None, side_b: list[Any] | None,
             request: gr.Request) -> Any:
        session = getattr(request, "session_hash", None)
        where = streaming(session)
        if not where:
            return gr.skip(), gr.Timer(active=False)
        return {**remember_chats(chat, side_a, side_b), "streaming": list(where), "page": session}, gr.skip()
    return keep


def remember_after(streaming: Streaming) -> Callable[..., Any]:
    """The save after a Send, Regenerate, Compare or Clear event: ``remember_chats``, marked like an
    autosave where a reply of the page still streams (a Send refused while one streamed ends at once;
    its save must not pass the streaming reply off as complete)."""
    def keep(chat: list[Any] | None, side_a: list[Any] | None, side_b: list[Any] | None,
             request: gr.Request) -> dict[str, Any]:
        session = getattr(request, "session_hash", None)
        where = streaming(session)
        return {**remember_chats(chat, side_a, side_b), **({"streaming": list(where), "page": session} if where
                                                           else {})}
    return keep


def restore_chats(saved: Any, settings: Any, lang: str | None = None) -> list[Any]:
    """On page load: the conversations and settings as this browser left them (nothing changes
    without them; a setting out of its slider's range is left at its default). A reply saved while it
    streamed ends with a note (the model is not sent it, as with Stop): that it was cut off, or, where
    the page that streams it (another tab) still does, that it is still being written there. Settings
    saved before they had their own storage come from the conversations' (one dict held both)."""
    chats: list[Any] = [gr.skip()] * 3
    if isinstance(saved, dict):
        chats = [as_messages(saved.get(key) if isinstance(saved.get(key), list) else []) for key in ("chat", "a", "b")]
        streaming = saved.get("streaming") if isinstance(saved.get("streaming"), list) else []
        page = saved.get("page") if isinstance(saved.get("page"), str) else None
        for where, sides in (("chat", chats[:1]), ("compare", chats[1:])):
            answered = [turns for turns in sides if turns and turns[-1]["role"] == "assistant"]
            if where in streaming and answered:
                note = _interrupted_note(page, where, i18n.normalize(lang))
                for turns in answered:
                    turns[-1]["content"] += note
        settings = settings if isinstance(settings, dict) else saved
    if not isinstance(settings, dict):
        return [*chats, *[gr.skip()] * (len(RESTORED) - 3)]
    system = settings.get("system")
    sliders = []
    for key, (low, high, _, _) in SLIDERS.items():
        value = settings.get(key)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        sliders.append(value if ok else gr.skip())
    return [*chats, system if isinstance(system, str) else gr.skip(), *sliders]


def _interrupted_note(page: str | None, where: str, lang: str) -> str:
    """The note under a reply saved while it streamed: still being written, where the page that
    streamed it still streams it (after ``RESTORE_WAIT_S``: the reply of a page just reloaded ends a
    moment later), else cut off."""
    if page is not None and not RUNNING.wait_ended(reply_key(page, where), RESTORE_WAIT_S):
        return f"\n\n{WRITING_MARK} {i18n.t('chat.still_writing', lang)}"
    return f"\n\n{STOPPED_MARK} {i18n.t('chat.cut_off', lang)}"


def newest_turns(turns: list[dict[str, str]], budget: int) -> list[dict[str, str]]:
    """The newest messages whose text fits ``budget`` characters, starting at a question."""
    kept, used = 0, 0
    for msg in reversed(turns):
        used += len(msg["content"])
        if used > budget:
            break
        kept += 1
    out = turns[len(turns) - kept:] if kept else []
    while out and out[0]["role"] == "assistant":
        out = out[1:]
    return out
