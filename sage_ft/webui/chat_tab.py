"""Chat tab: which model answers (banner + picker), switching with progress, streaming chat, Compare.

Every model change goes through ``ServerManager.switch`` in a background thread (a closed browser
never leaves a half-done switch), while the handler streams progress and ends with exactly one of
✅ live / ⚠️ restart needed / ❌ failed. Chat replies are pumped from ``stream_chat`` in a thread
into a queue, so Stop answers at once and a server error becomes a message in the chat, never a
frozen spinner (the messages themselves: ``chat_messages``; kept across reloads: ``chat_memory``).
Compare streams two served names (the base and its LoRAs) concurrently. One reply streams in a chat
at a time: Send, Enter or Regenerate while one streams is refused with a short note (the message stays
in its box), so two replies never stream into one chat and Stop always reaches the one streaming.
A chat sent while the server is stopped (or crashed) starts it, the reply saying so meanwhile.
"""

from __future__ import annotations

import contextlib
import html
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from sage_ft.webui import chat_memory, i18n, server_panel
from sage_ft.webui.chat_messages import (
    ERROR_MARK,
    RUNNING,
    STOPPED_MARK,
    Pump,
    Reply,
    Report,
    as_messages,
    prompt_of,
    reply_key,
)
from sage_ft.webui.components import TOAST_S, Registry, page_stamp
from sage_ft.webui.services import AppServices
from sage_ft.webui.topbar import TickPart
from sage_ft.webui.uploads import PathRefused

log = logging.getLogger(__name__)

TYPE_TAGS = {"base": "base", "adapter": "finetuned · LoRA", "lora": "finetuned · LoRA", "merged": "merged"}
CLEAR_WAIT_S = 2.0  # the longest 🧹 Clear waits for a streaming reply to end before it empties the chat
_BANNER_STYLE = ("border:1px solid var(--border-color-primary);border-left:5px solid {color};border-radius:8px;"
                 "padding:8px 12px;line-height:1.6")
_STATE_COLORS = {"ready": "#16a34a", "starting": "#d97706", "switching": "#d97706", "crashed": "#dc2626"}


# ====================================================================== layout
def build(reg: Registry, services: AppServices, lang: str) -> None:
    reg.add("chat.banner_stamp", page_stamp(), kind="none")
    reg.add("chat.banner", gr.HTML(banner_html(services, lang), elem_id="chat-banner"), kind="none")
    choices = model_choices(services)
    # Without a chat server (--no-llm) nothing here can answer or switch: the controls that ask it are
    # off for the app's life, and the banner says why and how to turn chat on.
    live = services.server is not None
    with gr.Row(equal_height=True):
        reg.add("chat.model", gr.Dropdown(choices=choices, value=current_value(_status(services), choices), scale=5,
                                          allow_custom_value=True, elem_id="chat-model", interactive=live,
                                          label=i18n.t("chat.model", lang), info=i18n.t("chat.model.info", lang)),
                kind="label_info")
        reg.add("chat.switch", gr.Button(i18n.t("chat.switch", lang), variant="primary", scale=1,
                                         elem_id="chat-switch", interactive=live))
        # on only while a switch has something to cancel (``_switch_cancellable``: the tick and the switch set it)
        reg.add("chat.switch_cancel", gr.Button(i18n.t("chat.switch_cancel", lang), variant="stop", scale=0,
                                                min_width=120, elem_id="chat-switch-cancel", interactive=False))
        reg.add("chat.refresh", gr.Button(i18n.t("chat.refresh", lang), scale=0, min_width=60))
    reg.add("chat.switch_status", gr.Markdown("", elem_id="chat-switch-status"), kind="none")
    reg.add("chat.log_file", gr.File(label=i18n.t("chat.log_file", lang), visible=False, interactive=False))
    with gr.Tabs():
        with reg.add("chat.single", gr.Tab(i18n.t("chat.single", lang), elem_id="chat-single")):
            reg.add("chat.chatbot", gr.Chatbot(label=i18n.t("chat.chatbot", lang), height=420, elem_id="chatbot",
                                               feedback_options=None, buttons=["copy"]))
            with gr.Row(equal_height=True):
                reg.add("chat.message", gr.Textbox(label=i18n.t("chat.message", lang), scale=6, lines=1,
                                                   max_lines=6, elem_id="chat-input", submit_btn=False,
                                                   interactive=live))
                reg.add("chat.send", gr.Button(i18n.t("chat.send", lang), variant="primary", scale=1,
                                               elem_id="chat-send", interactive=live))
                reg.add("chat.stop", gr.Button(i18n.t("chat.stop", lang), variant="stop", scale=1,
                                               elem_id="chat-stop", interactive=live))
            with gr.Row():
                reg.add("chat.regenerate", gr.Button(i18n.t("chat.regenerate", lang), size="sm", interactive=live))
                reg.add("chat.clear", gr.Button(i18n.t("chat.clear", lang), size="sm", elem_id="chat-clear"))
        with reg.add("chat.compare_tab", gr.Tab(i18n.t("chat.compare_tab", lang), elem_id="chat-compare")):
            reg.add("chat.compare_help", gr.Markdown(i18n.t("chat.compare_help", lang)))
            with gr.Row():
                for side in ("a", "b"):
                    with gr.Column():
                        reg.add(f"chat.model_{side}", gr.Dropdown(choices=choices, value=None, allow_custom_value=True,
                                                                  label=i18n.t(f"chat.model_{side}", lang),
                                                                  interactive=live))
                        reg.add(f"chat.compare_{side}", gr.Chatbot(label=i18n.t(f"chat.model_{side}", lang),
                                                                   height=340, feedback_options=None,
                                                                   buttons=["copy"], elem_id=f"compare-{side}"),
                                key=f"chat.model_{side}")
            with gr.Row(equal_height=True):
                reg.add("chat.compare_message", gr.Textbox(label=i18n.t("chat.message", lang), scale=6,
                                                           elem_id="compare-input", interactive=live),
                        key="chat.message")
                reg.add("chat.compare_send", gr.Button(i18n.t("chat.compare_send", lang), variant="primary",
                                                       scale=1, interactive=live))
                reg.add("chat.compare_stop", gr.Button(i18n.t("chat.stop", lang), variant="stop", scale=1,
                                                       interactive=live), key="chat.stop")
                reg.add("chat.compare_clear", gr.Button(i18n.t("chat.clear", lang), scale=1), key="chat.clear")
            reg.add("chat.compare_status", gr.Markdown(""), kind="none")
    with reg.add("chat.settings", gr.Accordion(i18n.t("chat.settings", lang), open=False)):
        reg.add("chat.system", gr.Textbox(label=i18n.t("chat.system", lang), lines=2, value="", elem_id="chat-system"))
        with gr.Row():
            for key, (low, high, default, step) in chat_memory.SLIDERS.items():
                reg.add(f"chat.{key}", gr.Slider(low, high, value=default, step=step, label=i18n.t(f"chat.{key}", lang),
                                                 elem_id=f"chat-{key.replace('_', '-')}"))
    server_panel.build(reg, services, lang)


def wire(reg: Registry, services: AppServices) -> TickPart:
    lang = reg["top.lang"]
    settings = [reg["chat.system"], reg["chat.temperature"], reg["chat.top_p"], reg["chat.max_tokens"], lang]
    pickers = [reg["chat.model"], reg["chat.model_a"], reg["chat.model_b"]]
    banner_out = [reg["chat.banner"], reg["chat.banner_stamp"]]

    refresh = lambda lg, a, b: refresh_models(services, lg, a, b)  # noqa: E731
    refresh_in = [lang, reg["chat.model_a"], reg["chat.model_b"]]
    reg["chat.refresh"].click(refresh, refresh_in, [*pickers, *banner_out], api_name="chat_models",
                              show_progress="hidden")
    reg["tab.chat"].select(refresh, refresh_in, [*pickers, *banner_out], api_name=False, show_progress="hidden")

    def switch_to(model, lg):
        yield from switch(services, model, lg)

    # "multiple": a pick made while a switch runs is not dropped (Gradio's default) but switched to next
    gr.on([reg["chat.switch"].click, reg["chat.model"].select], switch_to, [reg["chat.model"], lang],
          [reg["chat.switch_status"], reg["chat.log_file"], *banner_out, reg["chat.model"], reg["chat.switch_cancel"]],
          api_name="chat_switch",
          concurrency_limit=None, show_progress="minimal", trigger_mode="multiple")

    reg["chat.switch_cancel"].click(lambda lg: cancel_switch(services, lg), lang, None, api_name="chat_switch_cancel",
                                    concurrency_limit=None, show_progress="hidden")

    chat_out = [reg["chat.chatbot"], reg["chat.message"]]

    def send(message, history, system, temperature, top_p, max_tokens, lg, request: gr.Request):
        yield from respond(services, message, history, system, temperature, top_p, max_tokens, lg, request)

    def again(history, system, temperature, top_p, max_tokens, lg, request: gr.Request):
        yield from regenerate(services, history, system, temperature, top_p, max_tokens, lg, request)

    def side_by_side(message, hist_a, hist_b, model_a, model_b, system, temperature, top_p, max_tokens, lg,
                     request: gr.Request):
        yield from compare(services, message, hist_a, hist_b, model_a, model_b, system, temperature, top_p,
                           max_tokens, lg, request)

    def stop_chat(request: gr.Request) -> None:
        stop(request)

    def stop_compare(request: gr.Request) -> None:
        stop(request, "compare")

    conversations = [reg["chat.chatbot"], reg["chat.compare_a"], reg["chat.compare_b"]]
    # What the browser keeps: a question as soon as it is sent (registered before the reply's event:
    # Gradio runs the events of one trigger in that order, so this few-ms save goes first and a page
    # reloaded while the reply streams keeps the question); the streaming reply every few seconds (the
    # autosave timer, started with it); the whole exchange and the settings once the reply is complete
    # or stopped; a setting when it is set (that alone).
    sent = {"chat": [reg["chat.send"].click, reg["chat.message"].submit],
            "compare": [reg["chat.compare_send"].click, reg["chat.compare_message"].submit]}
    autosave = [reg["chat.saved"], reg["chat.autosave"]]
    for where, message in (("chat", "chat.message"), ("compare", "chat.compare_message")):
        gr.on(sent[where], chat_memory.remember_question(where, streaming_in), [reg[message], *conversations],
              autosave, api_name=False, show_progress="hidden", trigger_mode="multiple")
    reg["chat.regenerate"].click(lambda: gr.Timer(active=True), None, reg["chat.autosave"], api_name=False,
                                 show_progress="hidden")
    reg["chat.autosave"].tick(chat_memory.remember_partial(streaming_in), conversations, autosave, api_name=False,
                              show_progress="hidden")
    # "multiple": a Send, Enter or Regenerate while a reply streams reaches its handler, which refuses it
    # with a note (Gradio's default for a click drops it without a word while the same event runs)
    replies = [
        gr.on(sent["chat"], send, [reg["chat.message"], reg["chat.chatbot"], *settings], chat_out,
              api_name="chat_send", concurrency_limit=None, show_progress="hidden", trigger_mode="multiple"),
        reg["chat.regenerate"].click(again, [reg["chat.chatbot"], *settings], chat_out, api_name="chat_regenerate",
                                     concurrency_limit=None, show_progress="hidden", trigger_mode="multiple"),
    ]

    def clear_chat(request: gr.Request) -> tuple[list[Any], Any]:
        """The conversation emptied; the message box keeps what is typed there (a Clear that landed
        after the next question was typed used to wipe it, as Compare's Clear never did)."""
        stop(request, clearing=True)  # a reply still streaming ends with the chat (it streamed on into it)
        return [], gr.skip()  # (stop returns once that reply has ended: an update it sent cannot land after this)

    changes = [*replies, reg["chat.clear"].click(clear_chat, None, chat_out, api_name="chat_clear",
                                                 show_progress="hidden")]
    reg["chat.stop"].click(stop_chat, None, None, api_name="chat_stop", concurrency_limit=None,
                           show_progress="hidden")

    compare_in = [reg["chat.compare_message"], reg["chat.compare_a"], reg["chat.compare_b"], reg["chat.model_a"],
                  reg["chat.model_b"], *settings]
    compare_out = [reg["chat.compare_a"], reg["chat.compare_b"], reg["chat.compare_status"],
                   reg["chat.compare_message"]]
    comparing = gr.on(sent["compare"], side_by_side, compare_in, compare_out, api_name="chat_compare",
                      concurrency_limit=None, show_progress="hidden", trigger_mode="multiple")

    def clear_compare(request: gr.Request) -> tuple[list[Any], list[Any], str]:
        stop(request, "compare", clearing=True)
        return [], [], ""

    changes += [comparing, reg["chat.compare_clear"].click(clear_compare, None, compare_out[:3], api_name=False,
                                                           show_progress="hidden")]
    reg["chat.compare_stop"].click(stop_compare, None, None, api_name="chat_compare_stop", concurrency_limit=None,
                                   show_progress="hidden")
    for change in changes:
        change.then(chat_memory.remember_after(streaming_in), conversations, reg["chat.saved"], api_name=False,
                    show_progress="hidden")
    # Settings are saved when one is set, never with a reply: a reply ending in one tab wrote that tab's
    # settings over a system prompt set in another tab meanwhile (every tab shares the storage).
    # `input`, not `release`: a slider moved with the arrow keys fires no release (pointer up / blur)
    set_by_hand = [reg["chat.system"].blur, *(reg[f"chat.{key}"].input for key in chat_memory.SLIDERS)]
    gr.on(set_by_hand, chat_memory.remember_settings, settings[:-1], reg["chat.settings_saved"], api_name=False,
          show_progress="hidden", trigger_mode="always_last")
    server_panel.wire(reg, services)
    return TickPart(("chat.banner_stamp", "top.lang"),
                    ("chat.banner", "chat.banner_stamp", "chat.model", "chat.switch_cancel"),
                    lambda stamp, lg: tick(services, stamp, lg))


# ====================================================================== models
def served_models(services: AppServices) -> list[Any]:
    """The registry's entries (base, fine-tuned with checkpoints, merged) plus completed/cancelled tasks
    whose run folder lies outside ``runs/`` (the registry only scans the data home)."""
    from sage_ft.models.registry import ModelEntry, list_models

    entries = list_models(include_checkpoints=True)
    known = {str(Path(e.path).resolve()) for e in entries if e.source != "config" or Path(e.path).exists()}
    for task in services.tasks.list(["completed", "cancelled"]):
        run = Path(task.output_dir)
        lora = run / "lora"
        if not (lora / "adapter_config.json").is_file() or str(lora.resolve()) in known:
            continue
        ckpts = sorted((int(c.name.split("-", 1)[1]), str(c)) for c in run.glob("checkpoint-*")
                       if c.name.split("-", 1)[1].isdigit() and (c / "adapter_config.json").is_file())
        entries.append(ModelEntry(name=f"#{task.id} {task.name}", path=str(lora), kind="lora",
                                  tags=["finetuned", "lora"], source="task", checkpoints=ckpts,
                                  base_model=str(task.config_dict.get("model_name_or_path") or "") or None,
                                  task_id=str(task.id)))
    return entries


def _value(path: str) -> str:
    """Choice values are resolved local paths (hub ids stay as they are), so the served model matches."""
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def _entries(services: AppServices) -> list[Any] | None:
    """``served_models``, or None when listing fails (the page then offers the demo model alone)."""
    try:
        return served_models(services)
    except Exception:  # the list must never break the page
        log.exception("listing models failed")
        return None


def model_choices(services: AppServices, kinds: tuple[str, ...] = ("base", "lora", "merged"),
                  entries: list[Any] | None = None) -> list[tuple[str, str]]:
    """``(label, value)`` pairs: bases, then fine-tunes with their checkpoints indented under them."""
    entries = entries if entries is not None else _entries(services)
    if entries is None:
        return [("demo [base]", "demo")]
    out = []
    for entry in entries:
        if entry.kind not in kinds:
            continue
        label = entry.label + ("" if entry.available else f" — {entry.note}")
        out.append((label, _value(entry.path)))
        for step, path in reversed(entry.checkpoints):
            out.append((f"    └ {entry.name} · checkpoint-{step} [checkpoint · LoRA]", _value(path)))
    return out


def served_value(status: dict[str, Any]) -> str | None:
    """The model the picker shows (``status`` is ``_status``'s): the one a switch under way brings,
    else the one answering. The picker follows it, so it never names a model that is not served."""
    path = status.get("switching_to") or status.get("model_path")
    return _value(str(path)) if path else None


def current_value(status: dict[str, Any], choices: list[tuple[str, str]]) -> str | None:
    """The picker's first value: ``served_value``, else the first choice."""
    return served_value(status) or (choices[0][1] if choices else None)


def compare_defaults(status: dict[str, Any], model_a: str | None, model_b: str | None,
                     entries: list[Any] | None = None) -> tuple[str | None, str | None]:
    """What Compare starts with, where the user has not picked: the served model's base (A) next to the
    served fine-tune (B), or, while the base itself is served, next to its newest fine-tune in
    ``entries`` — the comparison a fine-tune is made for. Picks are never overwritten."""
    served = status.get("model_path")
    base = status.get("base_model") or (served if status.get("model_type") == "merged" else None)
    if not model_a and base:
        model_a = _value(str(base))
    if not model_b and served and status.get("model_type") in ("adapter", "lora"):
        model_b = _value(str(served))
    elif not model_b and base:
        model_b = _newest_tune_of(str(base), entries or [])
    return model_a or None, model_b or None


def _newest_tune_of(base: str, entries: list[Any]) -> str | None:
    """The newest fine-tune (LoRA) of ``base`` among ``entries`` (the registry lists the newest first)."""
    from sage_ft.serving import TargetError, resolve_target

    for entry in entries:
        if entry.kind != "lora" or not entry.available:
            continue
        try:
            if resolve_target(entry.path).serving_base.resolve() == Path(base).resolve():
                return _value(entry.path)
        except (TargetError, OSError):  # a run whose base is gone: not a candidate
            continue
    return None


def refresh_models(services: AppServices, lang: str, model_a: str | None = None,
                   model_b: str | None = None) -> list[Any]:
    entries = _entries(services)
    choices = model_choices(services, entries=entries)
    status = _status(services)  # one snapshot for the picker and Compare
    compare_a, compare_b = compare_defaults(status, model_a, model_b, entries)
    return [gr.update(choices=choices, value=current_value(status, choices)),
            gr.update(choices=choices, value=compare_a), gr.update(choices=choices, value=compare_b),
            *banner_pair(services, lang, status)]


def _status(services: AppServices) -> dict[str, Any]:
    if services.server is None:
        return {}
    try:
        return services.server.status()
    except Exception as exc:  # a status read must never break the page
        log.exception("server status failed")
        return {"state": "error", "last_error": str(exc)}


# ====================================================================== banner
def banner_html(services: AppServices, lang: str, status: dict[str, Any] | None = None) -> str:
    """The served model: name, type, base, path, backend, port and state (``status``: a snapshot
    already read, so that the banner and the picker tell of the same moment)."""
    if services.server is None:
        key = "chat.off" if services.llm_disabled else "chat.unavailable"
        style = _BANNER_STYLE.format(color="#9ca3af")
        return f'<div class="sage-banner off" style="{style}">💬 {html.escape(i18n.t(key, lang))}</div>'
    s = status if status is not None else _status(services)
    state = str(s.get("state") or "unknown")
    label = s.get("model_label") or s.get("model")
    kind = str(s.get("model_type") or "")
    backend = {"vllm": "vLLM", "transformers": "transformers"}.get(str(s.get("backend")), str(s.get("backend")))
    name = _esc(str(label)) if label else _esc(i18n.t("chat.no_model", lang))
    tag = (f' <span class="tag" style="background:#e0e7ff;color:#3730a3;border-radius:6px;padding:1px 6px">'
           f'[{_esc(TYPE_TAGS.get(kind, kind))}]</span>' if kind else "")
    facts = [f'{i18n.t("chat.backend", lang)}: <b>{_esc(backend)}</b>'
             + (f' · {i18n.t("chat.port", lang)} {s["port"]}' if s.get("port") else "")]
    if s.get("base_model") and kind != "base":
        facts.append(f'{i18n.t("chat.base", lang)}: <code>{_esc(str(s["base_model"]))}</code>')
    elif s.get("merged_from"):  # a merged model is its own base: say what it was merged from
        facts.append(f'{i18n.t("chat.merged_from", lang)}: <code>{_esc(str(s["merged_from"]))}</code>')
    if s.get("model_path"):
        facts.append(f'{i18n.t("chat.path", lang)}: <code>{_esc(str(s["model_path"]))}</code>')
    detail = s.get("last_error") or (s.get("message") if state != "ready" else "")
    if s.get("backend") == "transformers":
        detail = s.get("backend_reason") or detail
    style = _BANNER_STYLE.format(color=_STATE_COLORS.get(state, "#9ca3af"))
    return (f'<div class="sage-banner state-{html.escape(state)}" data-state="{html.escape(state)}" style="{style}">'
            f'<div class="head">💬 {i18n.t("chat.serving", lang)}: <b class="model">{name}</b>{tag}'
            f' <span class="state">● {_esc(_state_text(state, lang))}</span></div>'
            f'<div class="facts">{" · ".join(facts)}</div>'
            + (f'<div class="detail">{_esc(str(detail))}</div>' if detail else "") + "</div>")


def _state_text(state: str, lang: str) -> str:
    key = f"serving.{state}"
    return i18n.t(key, lang) if key in i18n.strings(lang) else state


def banner_pair(services: AppServices, lang: str, status: dict[str, Any] | None = None) -> tuple[str, str]:
    """The banner and its stamp (what the page tick compares with, to send the banner only on a change)."""
    text = banner_html(services, i18n.normalize(lang), status)
    return text, text


def tick(services: AppServices, stamp: str | None, lang: str) -> tuple[Any, Any, Any, Any]:
    """The page tick's banner, and the picker set to the served model whenever the banner changes: a
    switch made elsewhere (another page, ``sage-ft switch``) or one that failed shows in both. With
    them the Cancel switch button (its state is in the stamp, so a switch from elsewhere turns it on)."""
    status = _status(services)
    text = banner_html(services, i18n.normalize(lang), status)
    cancellable = _switch_cancellable(services)
    new_stamp = f"{text}{CANCELLABLE_MARK if cancellable else ''}"
    if new_stamp == stamp:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    value = served_value(status)
    return text, new_stamp, (gr.update(value=value) if value else gr.skip()), gr.update(interactive=cancellable)


CANCELLABLE_MARK = "|cancellable"  # ends the tick's stamp while a switch can be cancelled


def _switch_cancellable(services: AppServices) -> bool:
    return services.server is not None and services.server.switch_cancellable


# ====================================================================== switching
def switch_steps(services: AppServices, model: str | None, lang: str,
                 label: str | None = None) -> Iterator[tuple[str, Any]]:
    """Switch the chat model in a background thread; yields ``(markdown, log file update)``: progress
    while it works, then exactly one final line (✅ live in N s / ⚠️ restart needed / ❌ failed + log)."""
    lang = i18n.normalize(lang)
    if model in (None, ""):
        yield f"⚠️ {i18n.t('chat.pick_model', lang)}", gr.update(visible=False)
        return
    if services.server is None:
        text = i18n.t("chat.off" if services.llm_disabled else "chat.unavailable", lang)
        gr.Warning(text)
        yield f"⚠️ {text}", gr.update(visible=False)
        return
    try:
        services.guard.check(str(model), i18n.t("chat.model", lang))
    except PathRefused as exc:
        gr.Warning(str(exc))
        yield f"❌ {_esc(str(exc))}", gr.update(visible=False)
        return
    shown = label or _label_for(services, str(model))
    gr.Info(i18n.t("chat.switching", lang, model=shown))
    box: dict[str, Any] = {"progress": ""}
    busy = _status(services).get("switching_to")  # switches run one after the other: say this one waits
    if busy and _value(str(busy)) != _value(str(model)):
        box["progress"] = f"({i18n.t('chat.switch_waits', lang, model=_label_for(services, str(busy)))})"

    def work() -> None:
        try:
            box["result"] = services.server.switch(str(model), progress=lambda p: box.__setitem__("progress", str(p)))
        except Exception as exc:  # switch() reports failures itself; this is a last resort
            log.exception("switch to %s failed", model)
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=work, name="sage-ft-chat-switch", daemon=True)
    started = time.monotonic()
    thread.start()
    last = None
    while thread.is_alive():
        text = f"⏳ {i18n.t('chat.switching', lang, model=shown)} {box['progress']} ({time.monotonic() - started:.0f} s)"
        if text != last:
            yield _esc(text), gr.skip()
            last = text
        thread.join(timeout=0.5)
    result = box.get("result")
    if result is None or result.outcome == "failed":
        reason = box.get("error") or (result.message if result else "unknown error")
        log_path = result.log_path if result is not None else None  # the start that failed, if one did
        text = i18n.t("chat.switch_failed", lang, model=shown, reason=reason)
        if log_path:
            text += f" — {i18n.t('chat.server_log', lang)}: `{log_path}`"
        gr.Warning(f"❌ {i18n.t('chat.switch_failed', lang, model=shown, reason=reason)}", duration=TOAST_S)
        file = gr.update(visible=False)
        if log_path and Path(log_path).is_file():
            file = gr.update(value=services.stage_download(log_path, "chat-server.log"), visible=True)
        yield f"❌ {_esc(text)}", file
        return
    seconds = result.timings.get("total_s", time.monotonic() - started)
    if result.outcome == "cancelled":
        text = i18n.t("chat.switch_cancelled", lang, model=shown, reason=result.message)
        gr.Info(f"⏹ {text}")
        yield f"⏹ {_esc(text)}", gr.update(visible=False)
        return
    if result.outcome == "restart_needed":
        text = i18n.t("chat.switch_restart", lang, model=shown, reason=result.message)
        gr.Warning(f"⚠️ {text}", duration=TOAST_S)
        yield f"⚠️ {_esc(text)}", gr.update(visible=False)
        return
    text = i18n.t("chat.switch_live", lang, model=shown, seconds=f"{seconds:.1f}")
    gr.Success(f"✅ {text}")
    yield f"✅ {_esc(text)} <small>({_esc(result.message)})</small>", gr.update(visible=False)


def cancel_switch(services: AppServices, lang: str) -> None:
    """The Cancel switch button: ends the adapter merge, server start or in-process load of a switch
    under way; the switch's own status line then reports ⏹ (the previous model keeps answering)."""
    if services.server is None or not services.server.cancel_switch():
        gr.Info(i18n.t("chat.no_switch", i18n.normalize(lang)))


def _label_for(services: AppServices, model: str) -> str:
    for label, value in model_choices(services):
        if value == _value(model):
            return label.strip(" └")
    return Path(model).name if "/" in model else model


def switch(services: AppServices, model: str | None, lang: str) -> Iterator[list[Any]]:
    """``switch_steps`` with the banner; the last step also sets the picker to the model now served
    (after a failed, cancelled or refused switch: the one still answering, not the one picked)."""
    steps = switch_steps(services, model, lang)
    step = next(steps)
    for following in steps:  # every step but the last; Cancel switch on while its step can be cancelled
        yield [*step, *banner_pair(services, lang), gr.skip(), gr.update(interactive=_switch_cancellable(services))]
        step = following
    status = _status(services)
    value = served_value(status)
    yield [*step, *banner_pair(services, lang, status), gr.update(value=value) if value else gr.skip(),
           gr.update(interactive=_switch_cancellable(services))]


# ====================================================================== chat
@contextlib.contextmanager
def _one_reply(request: Any, where: str, lang: str) -> Iterator[threading.Event | None]:
    """The cancel event of the page's new reply in ``where`` ("chat" / "compare"), held until the
    reply ends, is stopped, or its page goes away (Gradio then closes the generator); None, after a
    short note, while another reply streams there."""
    key = reply_key(getattr(request, "session_hash", None), where)
    cancel = RUNNING.claim(key)
    if cancel is None:
        gr.Warning(i18n.t("chat.busy", lang), duration=TOAST_S)
        yield None
        return
    try:
        yield cancel
    finally:  # (a reply whose page went away is ended too: the server stops writing it)
        cancel.set()
        RUNNING.release(key, cancel)


def streaming_in(session_hash: str | None) -> tuple[str, ...]:
    """Where the page ``session_hash`` has a reply streaming now: "chat" and/or "compare"."""
    return tuple(where for where in ("chat", "compare") if RUNNING.streaming(reply_key(session_hash, where)))


def stop(request: Any, where: str = "chat", clearing: bool = False) -> None:
    """Stop the session's running reply (the server aborts the request when the stream closes). When
    ``clearing`` (🧹 Clear), the reply ends on the cleared chat (``cleared_chat``), not with a "stopped"
    update that would bring it back, and this returns once it has ended (at its next 0.1-0.2 s check)."""
    key = reply_key(getattr(request, "session_hash", None), where)
    if RUNNING.stop(key, clearing) and clearing:
        RUNNING.wait_ended(key, CLEAR_WAIT_S)


def _cleared(cancel: threading.Event) -> bool:
    return bool(getattr(cancel, "clearing", False))


def cleared_chat() -> tuple[Any, ...]:
    """The last output of a reply ended by 🧹 Clear: the cleared chat. Gradio sends an event's last output
    once more when it completes, and that message can land after Clear's own (the cleared chat came
    back, now and then). New each time: Gradio pops keys from the update dicts it sends."""
    return [], gr.skip()


def cleared_compare() -> tuple[Any, ...]:
    """``cleared_chat`` for Compare: both sides and the status line emptied."""
    return [], [], "", gr.skip()


def _stream_args(system: str, temperature: float, top_p: float, max_tokens: float) -> dict[str, Any]:
    return {"system_prompt": (system or "").strip() or None, "temperature": float(temperature),
            "top_p": float(top_p), "max_tokens": int(max_tokens)}


def respond(services: AppServices, message: str, history: list[Any] | None, system: str, temperature: float,
            top_p: float, max_tokens: float, lang: str, request: Any = None) -> Iterator[tuple[list[Any], Any]]:
    """Append the user's message and stream the served model's answer into the chat."""
    lang = i18n.normalize(lang)
    if not (message or "").strip():
        yield gr.skip(), gr.skip()  # (not the chat as sent: a reply may be streaming into it)
        return
    with _one_reply(request, "chat", lang) as cancel:
        if cancel is None:  # a reply streams in this chat: the message stays in its box
            yield gr.skip(), gr.skip()
            return
        turns = as_messages(history) + [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield turns, ""
        yield from _answer(services, turns, _stream_args(system, temperature, top_p, max_tokens), lang, cancel)


def regenerate(services: AppServices, history: list[Any] | None, system: str, temperature: float, top_p: float,
               max_tokens: float, lang: str, request: Any = None) -> Iterator[tuple[list[Any], Any]]:
    """Answer the last question again (the previous answer is replaced)."""
    lang = i18n.normalize(lang)
    turns = as_messages(history)
    while turns and turns[-1]["role"] == "assistant":
        turns.pop()
    if not turns:
        yield gr.skip(), gr.skip()
        return
    with _one_reply(request, "chat", lang) as cancel:
        if cancel is None:  # the answer streaming now is kept (it was replaced mid-way)
            yield gr.skip(), gr.skip()
            return
        turns.append({"role": "assistant", "content": ""})
        yield turns, gr.skip()
        yield from _answer(services, turns, _stream_args(system, temperature, top_p, max_tokens), lang, cancel)


def _answer(services: AppServices, turns: list[dict[str, str]], args: dict[str, Any], lang: str,
            cancel: threading.Event) -> Iterator[tuple[list[Any], Any]]:
    reply = Reply(turns[-1])
    if services.server is None:
        reply.fail(f"⚠️ {i18n.t('chat.off' if services.llm_disabled else 'chat.unavailable', lang)}")
        yield turns, gr.skip()
        return
    from sage_ft.serving import stream_chat

    prompt = prompt_of(turns[:-1])
    manager = services.server

    def start(report: Report) -> Iterator[str]:
        _server_up(manager, cancel, report)
        return stream_chat(manager, prompt, cancel_event=cancel, **_reporting(report), **args)

    pump = Pump(start)
    while True:
        got = pump.drain(timeout=0.2)
        if cancel.is_set() and _cleared(cancel):
            yield cleared_chat()
            return
        if cancel.is_set():  # the stream also ends on cancel: stopped, even when "end" was already read
            reply.add(got._replace(done=False), lang)
            reply.stopped(lang)
            yield turns, gr.skip()
            return
        if reply.add(got, lang):
            yield turns, gr.skip()
        if got.done:
            return


def _server_up(manager: Any, cancel: threading.Event, report: Report) -> None:
    """Before a chat (in its pump's thread): a stopped or crashed server is started again, as the
    manager does on a chat request, and a start under way (a Restart, another page's chat) is waited
    for; either is reported (``("starting", stage)``), so the reply says so instead of staying empty
    for the tens of seconds a start takes. A server that answers, or cannot start, is left to
    ``stream_chat`` (which says why)."""
    while not cancel.is_set():
        status = manager.status()
        state = status.get("state")
        if state in ("stopped", "crashed") and manager.backend != "none" and status.get("model_path"):
            report("starting", "")
            manager.ensure_ready(progress=lambda p: report("starting", str(getattr(p, "stage", p))))
            return
        if state not in ("starting", "switching") or status.get("model"):  # (switching: the old one answers)
            return
        report("starting", str(status.get("message") or ""))
        cancel.wait(0.5)


def _starting_notes(manager: Any, cancel: threading.Event, lang: str) -> Iterator[str]:
    """``_server_up`` for Compare, whose sides need the server before they are resolved: a status line
    each second while it starts (nothing when it is up)."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            _server_up(manager, cancel, lambda _, stage: box.__setitem__("stage", stage))
        except Exception as exc:  # ChatError: each side then says why it cannot answer
            log.info("the chat server did not start for Compare: %s", exc)

    thread = threading.Thread(target=work, name="sage-ft-compare-start", daemon=True)
    started = time.monotonic()
    thread.start()
    while thread.is_alive() and not cancel.is_set():
        thread.join(timeout=1.0)
        if "stage" in box and thread.is_alive():
            stage = f"{box['stage']} · " if box["stage"] else ""
            yield f"⏳ {_esc(i18n.t('chat.server_starting', lang))} ({_esc(stage)}{time.monotonic() - started:.0f} s)"


def _reporting(report: Report) -> dict[str, Callable[..., None]]:
    """``stream_chat``'s callbacks, sending what they learn to a ``Pump``."""
    return {"on_route": lambda label: report("model", label),
            "on_fit": lambda turns, context: report("fit", (turns, context))}


# ====================================================================== compare
def served_name(manager: Any, model: str) -> str:
    """The request ``model`` name that answers as ``model`` on the running server, loading a LoRA of the
    served base next to the others when needed. Raises ``TargetError``/``ChatError`` when the model needs
    a server of its own (another base, a merged model)."""
    from sage_ft.serving import TargetError, resolve_target

    target = resolve_target(model)
    if target.kind == "adapter":
        return manager.load_adapter(model)
    status = manager.status()
    base = status.get("base_model") or status.get("model_path")  # a merged model is served as its own base
    if base and Path(base).resolve() == target.path.resolve():
        name = manager.base_served_name()
        if name:
            return name
    raise TargetError(f"{target.label} is not on the running server (it serves {base}); Compare answers with the "
                      "served base model and LoRA adapters of it side by side. Switch to it to chat with it alone")


def compare(services: AppServices, message: str, hist_a: list[Any] | None, hist_b: list[Any] | None,
            model_a: str | None, model_b: str | None, system: str, temperature: float, top_p: float,
            max_tokens: float, lang: str, request: Any = None) -> Iterator[tuple[Any, Any, str, Any]]:
    """The same prompt answered by two models at once (each side keeps its own conversation)."""
    lang = i18n.normalize(lang)
    sides = [as_messages(hist_a), as_messages(hist_b)]
    if not (message or "").strip():  # (the chats as they are: answers may be streaming into them)
        yield gr.skip(), gr.skip(), f"⚠️ {i18n.t('chat.empty_message', lang)}", gr.skip()
        return
    if model_a in (None, "") or model_b in (None, ""):
        yield gr.skip(), gr.skip(), f"⚠️ {i18n.t('chat.pick_two', lang)}", gr.skip()
        return
    with _one_reply(request, "compare", lang) as cancel:
        if cancel is None:  # both sides are answering still: the message stays in its box
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        yield from _compare(services, sides, message, model_a, model_b,
                            _stream_args(system, temperature, top_p, max_tokens), lang, cancel)


def _compare(services: AppServices, sides: list[list[dict[str, str]]], message: str, model_a: str | None,
             model_b: str | None, args: dict[str, Any], lang: str,
             cancel: threading.Event) -> Iterator[tuple[Any, Any, str, Any]]:
    for turns in sides:
        turns += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
    if services.server is None:
        note = f"⚠️ {i18n.t('chat.off' if services.llm_disabled else 'chat.unavailable', lang)}"
        for turns in sides:
            turns[-1]["content"] = note
        yield sides[0], sides[1], note, ""
        return
    yield sides[0], sides[1], f"⏳ {i18n.t('chat.loading_models', lang)}", ""
    for note in _starting_notes(services.server, cancel, lang):  # a stopped server is started first
        yield sides[0], sides[1], note, gr.skip()
    if cancel.is_set():
        stopped = f"{STOPPED_MARK} {i18n.t('chat.stopped', lang)}"
        yield cleared_compare() if _cleared(cancel) else (sides[0], sides[1], stopped, gr.skip())
        return
    from sage_ft.serving import stream_chat

    starts: list[Callable[[Report], Iterator[str]] | None] = []
    names = []
    replies = [Reply(turns[-1]) for turns in sides]
    for turns, reply, model in zip(sides, replies, (model_a, model_b), strict=True):
        try:
            services.guard.check(str(model), i18n.t("chat.model", lang))
            name = served_name(services.server, str(model))
        except Exception as exc:  # TargetError / ChatError / AdapterLoadError: said in that side's chat
            reply.fail(f"{ERROR_MARK} {exc}")
            starts.append(None)
            names.append("?")
            continue
        names.append(name)
        prompt = prompt_of(turns[:-1])
        starts.append(lambda report, p=prompt, n=name: stream_chat(services.server, p, model=n, cancel_event=cancel,
                                                                   **_reporting(report), **args))
    # Both sides stream at once, except base next to a LoRA where the server mixes them up (vLLM on
    # CPU, see ServerManager.mixed_lora_batches_safe): there side B starts when side A has finished.
    base = services.server.base_served_name()
    one_after_the_other = (not services.server.mixed_lora_batches_safe and None not in starts
                           and (names[0] == base) != (names[1] == base))
    pumps: list[Pump | None] = [None, None]
    for i in (0,) if one_after_the_other else (0, 1):
        pumps[i] = Pump(starts[i]) if starts[i] is not None else None
    # a side that was refused ("?") is named by what was picked
    shown = [services.server.label_of(name) if name != "?" else _label_for(services, str(model))
             for name, model in zip(names, (model_a, model_b), strict=True)]
    status = i18n.t("chat.comparing", lang, a=shown[0], b=shown[1])
    yield sides[0], sides[1], f"⏳ {_esc(status)}", gr.skip()
    running = [start is not None for start in starts]
    while any(running):
        changed = False
        for i, pump in enumerate(pumps):
            if pump is None or not running[i]:
                continue
            got = pump.drain(timeout=0.1)
            stopped = got.done and cancel.is_set() and got.error is None
            changed = replies[i].add(got._replace(done=got.done and not stopped), lang) or got.done or changed
            if got.done:
                running[i] = False
                if stopped:
                    replies[i].stopped(lang)
        if pumps[1] is None and running[1] and not running[0] and not cancel.is_set():
            pumps[1] = Pump(starts[1])  # one after the other: side A is done
        if cancel.is_set() and _cleared(cancel):
            yield cleared_compare()
            return
        if cancel.is_set():
            for i, is_running in enumerate(running):
                if is_running:
                    replies[i].stopped(lang)
            yield sides[0], sides[1], f"{STOPPED_MARK} {i18n.t('chat.stopped', lang)}", gr.skip()
            return
        if changed:
            yield sides[0], sides[1], f"⏳ {_esc(status)}", gr.skip()
    if "?" in names:  # a side (or both) could not answer: its reason is in its chat
        key = "chat.compared_none" if names == ["?", "?"] else "chat.compared_one"
        yield sides[0], sides[1], f"❌ {_esc(i18n.t(key, lang, a=shown[0], b=shown[1]))}", gr.skip()
        return
    yield sides[0], sides[1], f"✅ {_esc(i18n.t('chat.compared', lang, a=shown[0], b=shown[1]))}", gr.skip()


def _esc(text: object) -> str:
    """Escape text for Markdown/HTML text (quotes stay readable: no attribute contexts here)."""
    return html.escape(str(text), quote=False)
