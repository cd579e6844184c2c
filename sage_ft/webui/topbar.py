"""The top bar: title, language switch, chat model + serving status, device summary.

The status line is refreshed by a ``gr.Timer`` every ~2 s with cheap reads only (the server
manager's recorded state, NVML/psutil counters); the timer event has no concurrency limit and no
progress animation, so it never queues behind a long handler.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from sage_ft.webui import i18n
from sage_ft.webui.components import Registry
from sage_ft.webui.services import AppServices

REFRESH_S = 2.0


def build(reg: Registry, services: AppServices, lang: str) -> None:
    with gr.Row(elem_id="topbar", equal_height=True):
        reg.add("top.title", gr.Markdown(i18n.t("top.title", lang), elem_id="app-title"), key="top.title")
        reg.add("top.status", gr.HTML(status_html(services, lang), elem_id="top-status"), kind="none")
        reg.add("top.lang", gr.Dropdown(choices=[(i18n.LANG_NAMES[c], c) for c in i18n.LANGS], value=lang,
                                        label=i18n.t("top.lang", lang), elem_id="lang-select", scale=0,
                                        min_width=130))
    reg.add("top.timer", gr.Timer(REFRESH_S), kind="none")


def wire(reg: Registry, services: AppServices) -> None:
    reg["top.timer"].tick(lambda lang: status_html(services, lang), inputs=reg["top.lang"], outputs=reg["top.status"],
                          api_name="top_status", concurrency_limit=None, show_progress="hidden")


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
