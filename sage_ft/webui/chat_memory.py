"""The Chat tab's conversations and generation settings, kept in the browser.

A refresh, a closed tab or an app restart loses neither (other studios lose chat history on refresh).
Kept like the Train form's draft (``form_memory``): per browser, in its localStorage, encrypted with
the data home's key. Conversations are saved once a reply is complete and a question as soon as it is
sent (a page reloaded while the reply streams still shows it; Regenerate answers it); settings when
one is set and with each reply. The two are kept apart: every tab of a browser shares that storage,
and a page opened earlier holds the conversations as they were then, so setting a slider there must
not write those back over what another tab said since.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from sage_ft.webui import form_memory
from sage_ft.webui.chat_messages import as_messages
from sage_ft.webui.components import Registry

STORAGE_KEY = "sage-ft-chats"
SETTINGS_KEY = "sage-ft-chat-settings"
# What the browser keeps of each conversation (characters, newest turns kept): localStorage holds about
# 5 MB per site, and the Train form's draft lives there too.
SAVED_CHARS = {"chat": 300_000, "a": 100_000, "b": 100_000, "system": 20_000}
# The generation sliders: (minimum, maximum, default, step).
SLIDERS = {"temperature": (0.0, 2.0, 0.7, 0.05), "top_p": (0.05, 1.0, 1.0, 0.05), "max_tokens": (1, 2048, 256, 1)}
# The components restored on page load, in ``restore_chats``'s order (``chat.<name>`` in the registry).
RESTORED = ("chatbot", "compare_a", "compare_b", "system", *SLIDERS)


def build_state(reg: Registry) -> None:
    """The browser states ``chat.saved`` (conversations) and ``chat.settings_saved``. Built outside the
    tabs: a browser state inside a tab not yet opened is not mounted when the page loads, so it would
    read as empty."""
    secret = form_memory.browser_secret()
    reg.add("chat.saved", gr.BrowserState(None, storage_key=STORAGE_KEY, secret=secret), kind="none")
    reg.add("chat.settings_saved", gr.BrowserState(None, storage_key=SETTINGS_KEY, secret=secret), kind="none")


def remember_chats(chat: list[Any] | None, side_a: list[Any] | None, side_b: list[Any] | None) -> dict[str, Any]:
    """What this browser keeps of its conversations (Chat and both Compare sides), so a refresh or an
    app restart loses none; each is cut to its newest turns within ``SAVED_CHARS``."""
    return {key: newest_turns(as_messages(turns), SAVED_CHARS[key])
            for key, turns in (("chat", chat), ("a", side_a), ("b", side_b))}


def remember_settings(system: str | None, temperature: float, top_p: float, max_tokens: float) -> dict[str, Any]:
    """What this browser keeps of the generation settings."""
    return {"system": str(system or "")[:SAVED_CHARS["system"]], "temperature": temperature, "top_p": top_p,
            "max_tokens": max_tokens}


def remember_question(where: str) -> Callable[..., Any]:
    """The handler a Send runs just before its reply (``where``: "chat", or "compare" for both Compare
    sides): the conversations ``remember_chats`` keeps, with the question just sent added to that one.
    The reply streams for seconds and is kept once complete; a reload before then would lose the
    question too."""
    def keep(message: str | None, chat: list[Any] | None, side_a: list[Any] | None,
             side_b: list[Any] | None) -> Any:
        if not (message or "").strip():
            return gr.skip()
        asked = [{"role": "user", "content": message}]
        if where == "chat":
            chat = [*as_messages(chat), *asked]
        else:
            side_a, side_b = [*as_messages(side_a), *asked], [*as_messages(side_b), *asked]
        return remember_chats(chat, side_a, side_b)
    return keep


def restore_chats(saved: Any, settings: Any) -> list[Any]:
    """On page load: the conversations and settings as this browser left them (nothing changes
    without them; a setting out of its slider's range is left at its default). Settings saved before
    they had their own storage come from the conversations' (one dict held both)."""
    chats = [gr.skip()] * 3
    if isinstance(saved, dict):
        chats = [as_messages(saved.get(key) if isinstance(saved.get(key), list) else []) for key in ("chat", "a", "b")]
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
