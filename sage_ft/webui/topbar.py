"""The top bar: title, language switch, chat model + serving status, device summary, and the page's
one ``gr.Timer``.

Every ~2 s the timer fires ONE event per page (``wire_tick``), not one per tab: each tab contributes
a ``TickPart`` (its inputs, outputs and a cheap function) and the combined handler returns
``gr.skip()`` for every output whose data did not change since that page's last tick (each part
keeps a fingerprint in the page, ``components.page_stamp``). The timer event has no concurrency
limit and no progress animation, so it never queues behind a long handler, and it fires whether or
not the last tick has answered (``trigger_mode="multiple"``): under Gradio's default for a timer
("once") a tick whose answer never reaches the page holds back every later one, and the page stays
frozen until reloaded (a CI run saw a Train tab's progress stop while its task went on; that cause is
likely, not proven). A tick that lands late is corrected by the next: its fingerprint came in the
same message as what it drew, so the next tick compares with what the page really shows.
The per-part endpoints that API clients and tests call by name (``top_status``, ``train_progress``,
``monitor_tick``, ``task_details``) hang on ``top.api``, a timer that is never active, so they never
fire from the page.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from sage_ft.webui import i18n
from sage_ft.webui.components import Registry, page_stamp
from sage_ft.webui.services import AppServices

log = logging.getLogger(__name__)
REFRESH_S = 2.0


@dataclass(frozen=True)
class TickPart:
    """One tab's share of the page tick: ``fn(*inputs) -> outputs`` (registry ids; skips when unchanged)."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fn: Callable[..., Sequence[Any]]


def wire_tick(reg: Registry, parts: Sequence[TickPart]) -> None:
    """Bind every part to the page timer as one event (one request per page per tick)."""
    keys = list(dict.fromkeys(k for part in parts for k in part.inputs))

    def tick(*values: Any) -> list[Any]:
        given = dict(zip(keys, values, strict=True))
        out: list[Any] = []
        for part in parts:
            try:
                got = list(part.fn(*[given[k] for k in part.inputs]))
            except Exception:  # one part failing must not freeze the rest of the page
                log.exception("page tick: %s failed", part.outputs)
                got = [gr.skip()] * len(part.outputs)
            out += got
        return out

    reg["top.timer"].tick(tick, [reg[k] for k in keys], [reg[k] for part in parts for k in part.outputs],
                          api_name=False, concurrency_limit=None, show_progress="hidden", trigger_mode="multiple")


def build(reg: Registry, services: AppServices, lang: str) -> None:
    with gr.Row(elem_id="topbar", equal_height=True):
        reg.add("top.title", gr.Markdown(i18n.t("top.title", lang), elem_id="app-title"), key="top.title")
        reg.add("top.status", gr.HTML(status_html(services, lang), elem_id="top-status"), kind="none")
        reg.add("top.lang", gr.Dropdown(choices=[(i18n.LANG_NAMES[c], c) for c in i18n.LANGS], value=lang,
                                        label=i18n.t("top.lang", lang), elem_id="lang-select", scale=0,
                                        min_width=130))
    reg.add("top.timer", gr.Timer(REFRESH_S), kind="none")
    reg.add("top.api", gr.Timer(REFRESH_S, active=False), kind="none")
    reg.add("top.stamp", page_stamp(), kind="none")


def wire(reg: Registry, services: AppServices) -> TickPart:
    reg["top.api"].tick(lambda lang: status_html(services, lang), inputs=reg["top.lang"], outputs=reg["top.status"],
                        api_name="top_status", concurrency_limit=None, show_progress="hidden")
    return TickPart(("top.stamp", "top.lang"), ("top.status", "top.stamp"), lambda stamp, lg: tick(services, stamp, lg))


def tick(services: AppServices, stamp: str | None, lang: str) -> tuple[Any, Any]:
    """The status line, or two skips when it reads the same as on this page's last tick."""
    text = status_html(services, lang)
    return (gr.skip(), gr.skip()) if text == stamp else (text, text)


def status_html(services: AppServices, lang: str) -> str:
    lang = i18n.normalize(lang)
    serving = services.serving_summary()
    model = serving.get("model")
    state = str(serving.get("state") or "unknown")
    kind = serving.get("kind")
    chip_kind = f'<span class="tag">{html.escape(str(kind))}</span>' if kind else ""
    model_text = html.escape(str(model)) if model else i18n.t("top.no_chat_model", lang)
    key = "serving." + state.replace(" ", "_")
    state_text = i18n.t(key, lang) if key in i18n.strings(lang) else state
    detail = html.escape(str(serving.get("detail") or ""), quote=True)
    parts = [f'<span class="item">💬 {i18n.t("top.chat_model", lang)}: <b>{model_text}</b> {chip_kind}</span>',
             f'<span class="item state-{html.escape(state)}" title="{detail}">● {html.escape(state_text)}</span>',
             f'<span class="item">🖥 {html.escape(device_text(services.device_summary(), lang))}</span>']
    return '<div class="sage-status">' + "".join(parts) + "</div>"


def device_text(info: dict[str, Any], lang: str) -> str:
    """One line: each GPU's memory and utilisation, or CPU load and RAM use (from ``gpu.device_info``)."""
    gib = 1024**3
    if info.get("mode") == "gpu" and info.get("gpus"):
        items = []
        for g in info["gpus"]:
            text = f"GPU{g.get('index', '')} {g.get('name', '')}"
            if g.get("memory_total"):
                text += f" {g.get('memory_used', 0) / gib:.1f}/{g['memory_total'] / gib:.0f} GiB"
            if g.get("utilization") is not None:
                text += f" {g['utilization']}%"
            items.append(text)
        return " · ".join(items)
    cpu = info.get("cpu") or {}
    parts = [i18n.t("top.cpu_only", lang)]
    if info.get("cpu_percent") is not None:
        parts.append(f"CPU {info['cpu_percent']:.0f}% ×{cpu.get('count') or '?'}")
    if cpu.get("ram_total"):
        used = cpu["ram_total"] - cpu.get("ram_available", 0)
        parts.append(f"RAM {used / gib:.1f}/{cpu['ram_total'] / gib:.0f} GiB")
    return " · ".join(parts)
