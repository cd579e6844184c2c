"""The chat server panel (inside the Chat tab): status, uptime, served models and adapters, vLLM
metrics (running/waiting requests, KV-cache use, tokens/s), the log tail, restart and stop.

Its own ``gr.Timer`` runs only while the panel is open, and each tick is cheap: the manager's
recorded status, one local ``GET /metrics`` and the last few KiB of the server log (while a server
starts, of its start log, which grows as it starts). Tokens/s is the change of vLLM's generation-token
counter between two ticks (kept in a ``gr.State``). The line under the buttons (⏹ stopped, ✅ restarted)
is kept with the state it was written for, and cleared once the server has left that state: a chat
message or a switch starts a stopped server again.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

from sage_ft.filetail import tail_lines
from sage_ft.webui import i18n, render
from sage_ft.webui.components import TOAST_S, Registry
from sage_ft.webui.services import AppServices

log = logging.getLogger(__name__)
REFRESH_S = 3.0
LOG_LINES = 40
_TAIL_BYTES = 16 * 1024


def build(reg: Registry, services: AppServices, lang: str) -> None:
    with reg.add("server.panel", gr.Accordion(i18n.t("server.panel", lang), open=False, elem_id="server-panel")):
        reg.add("server.counters", gr.State(None), kind="none")
        reg.add("server.timer", gr.Timer(REFRESH_S, active=False), kind="none")
        with gr.Row():
            reg.add("server.status", gr.HTML("", elem_id="server-status"), kind="none")
            reg.add("server.metrics", gr.HTML("", elem_id="server-metrics"), kind="none")
        with gr.Row():
            reg.add("server.refresh", gr.Button(i18n.t("server.refresh", lang), size="sm"))
            live = services.server is not None  # --no-llm: no server to restart or stop (the status says so)
            reg.add("server.restart", gr.Button(i18n.t("server.restart", lang), size="sm", interactive=live))
            reg.add("server.stop", gr.Button(i18n.t("server.stop", lang), size="sm", variant="stop", interactive=live))
        reg.add("server.message", gr.Markdown("", elem_id="server-message"), kind="none")
        # the line above and the server state it tells of ({"state", "text"}; None while a restart writes it)
        reg.add("server.message_for", gr.State(None), kind="none")
        reg.add("server.log", gr.Textbox(label=i18n.t("server.log", lang), lines=10, max_lines=10, autoscroll=True,
                                         interactive=False, elem_id="server-log"))


def wire(reg: Registry, services: AppServices) -> None:
    lang = reg["top.lang"]
    message = [reg["server.message"], reg["server.message_for"]]
    outputs = [reg["server.status"], reg["server.metrics"], reg["server.log"], reg["server.counters"], *message]
    poll_in = [reg["server.counters"], reg["server.message_for"], lang]
    poll = lambda counters, told, lg: refresh(services, counters, lg, told)  # noqa: E731
    reg["server.timer"].tick(poll, poll_in, outputs, api_name=False, concurrency_limit=None, show_progress="hidden")
    reg["server.refresh"].click(poll, poll_in, outputs, api_name="server_status", concurrency_limit=None,
                                show_progress="hidden")
    reg["server.panel"].expand(lambda c, told, lg: [gr.Timer(active=True), *refresh(services, c, lg, told)],
                               poll_in, [reg["server.timer"], *outputs], api_name=False, show_progress="hidden")
    reg["server.panel"].collapse(lambda: gr.Timer(active=False), None, reg["server.timer"], api_name=False)
    def restart_server(lg):
        yield from restart(services, lg)

    reg["server.restart"].click(restart_server, lang, message, api_name="server_restart", show_progress="minimal")
    reg["server.stop"].click(lambda lg: stop_server(services, lg), lang, message, api_name="server_stop",
                             show_progress="minimal")


def refresh(services: AppServices, counters: dict[str, float] | None, lang: str,
            told: dict[str, Any] | None = None) -> list[Any]:
    """Status HTML, metrics HTML, log tail, the counters for the next tokens/s reading, and the line
    under the buttons with the state it tells of (``told``, ``_told``'s): cleared once the server left
    that state (a chat message or a switch started a stopped server)."""
    lang = i18n.normalize(lang)
    if services.server is None:
        key = "chat.off" if services.llm_disabled else "chat.unavailable"
        return [f"<p>{_esc(i18n.t(key, lang))}</p>", "", "", None, gr.skip(), gr.skip()]
    try:
        status = services.server.status()
    except Exception as exc:  # never break the page on a status read
        log.exception("server status failed")
        return [f"<p>❌ {_esc(str(exc))}</p>", "", "", None, gr.skip(), gr.skip()]
    if not isinstance(told, dict):  # nothing said yet, or a restart is saying it
        message = [gr.skip(), gr.skip()]
    elif told.get("state") != status.get("state"):
        message = ["", None]
    else:
        message = [told.get("text", ""), gr.skip()]
    metrics = services.server.metrics() if status.get("backend") == "vllm" else {}
    now = time.monotonic()
    tokens = metrics.get("generation_tokens_total")
    rate = None
    if isinstance(tokens, (int, float)) and counters and counters.get("pid") == status.get("pid"):
        elapsed = now - counters["t"]
        if elapsed > 0:
            rate = max(0.0, (tokens - counters["tokens"]) / elapsed)
    new_counters = {"t": now, "tokens": tokens, "pid": status.get("pid")} if isinstance(tokens, (int, float)) else None
    return [status_html(status, lang), metrics_html(metrics, rate, lang), log_tail(status), new_counters, *message]


def status_html(status: dict[str, Any], lang: str) -> str:
    state = str(status.get("state") or "unknown")
    key = f"serving.{state}"
    rows = [(i18n.t("server.state", lang), i18n.t(key, lang) if key in i18n.strings(lang) else state),
            (i18n.t("chat.backend", lang), status.get("backend_reason") or status.get("backend")),
            (i18n.t("server.uptime", lang), render.duration(status.get("uptime_s"))),
            (i18n.t("chat.port", lang), status.get("port")), ("pid", status.get("pid")),
            (i18n.t("server.served", lang), status.get("model_label") or status.get("model")),
            (i18n.t("server.context", lang), i18n.t("server.context_tokens", lang, n=f"{status['context_len']:,}")
             if status.get("context_len") else None),
            (i18n.t("server.adapters", lang), ", ".join(f"{n} ({label})" for n, label in
                                                       (status.get("adapters") or {}).items())),
            (i18n.t("server.log_path", lang), status.get("log_path") or status.get("start_log_path")),
            (i18n.t("server.last_error", lang), status.get("last_error"))]
    body = "".join(f"<tr><th>{_esc(str(k))}</th><td>{_esc(str(v))}</td></tr>" for k, v in rows
                   if v not in (None, ""))
    return f'<table class="sage-kv" data-state="{html.escape(state)}">{body}</table>'


def metrics_html(metrics: dict[str, Any], tokens_per_s: float | None, lang: str) -> str:
    if not metrics:
        return f"<p>{_esc(i18n.t('server.no_metrics', lang))}</p>"
    if metrics.get("error"):
        return f"<p>⚠️ {_esc(i18n.t('server.metrics_error', lang))}: {_esc(str(metrics['error']))}</p>"
    rows = [(i18n.t("server.running", lang), f"{metrics.get('requests_running', 0):.0f}"),
            (i18n.t("server.waiting", lang), f"{metrics.get('requests_waiting', 0):.0f}"),
            (i18n.t("server.kv_cache", lang), f"{100 * float(metrics.get('kv_cache_usage') or 0):.1f} %"),
            (i18n.t("server.tokens_per_s", lang), "…" if tokens_per_s is None else f"{tokens_per_s:,.1f}"),
            (i18n.t("server.generated", lang), f"{metrics.get('generation_tokens_total', 0):,.0f}")]
    if metrics.get("running_adapters"):
        rows.append((i18n.t("server.adapters", lang), ", ".join(metrics["running_adapters"])))
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="sage-kv metrics">{body}</table>'


def log_tail(status: dict[str, Any], lines: int = LOG_LINES) -> str:
    """The last lines of the server log (reads only the file's last few KiB): of the server being
    started while one starts (its log grows as it starts), else of the one running."""
    starting = status.get("start_log_path")
    path = starting or status.get("log_path")
    if not path:
        return status.get("log_tail") or ""
    try:
        return tail_lines(path, lines, _TAIL_BYTES)
    except FileNotFoundError as exc:  # a start log is created a moment after the start begins
        return "" if starting else f"{path}: {exc}"
    except OSError as exc:
        return f"{path}: {exc}"


def _told(services: AppServices, text: str) -> tuple[str, dict[str, Any] | None]:
    """The panel's line and what the panel keeps of it: the server state it tells of, read now."""
    try:
        return text, {"state": services.server.status().get("state"), "text": text}
    except Exception:  # a status read must never break the panel
        log.exception("server status failed")
        return text, None


def restart(services: AppServices, lang: str) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """Bring the chosen model back on a fresh server; progress while it starts. Yields the panel's line
    and ``_told``'s record of it (None while it works: the panel's tick leaves the line alone)."""
    lang = i18n.normalize(lang)
    if services.server is None:
        yield f"⚠️ {i18n.t('chat.off' if services.llm_disabled else 'chat.unavailable', lang)}", None
        return
    box: dict[str, Any] = {"progress": ""}

    def work() -> None:
        try:
            box["result"] = services.server.restart(progress=lambda p: box.__setitem__("progress", str(p)))
        except Exception as exc:  # restart() reports failures itself; this is a last resort
            log.exception("restart failed")
            box["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=work, name="sage-ft-chat-restart", daemon=True)
    thread.start()
    while thread.is_alive():
        yield f"⏳ {_esc(i18n.t('server.restarting', lang))} {_esc(box['progress'])}", None
        thread.join(timeout=1.0)
    result = box.get("result")
    if result is not None and result.outcome == "live":
        text = i18n.t("server.restarted", lang, seconds=f"{result.timings.get('total_s', 0):.1f}")
        gr.Success(text)
        yield _told(services, f"✅ {_esc(text)}")
        return
    reason = box.get("error") or (result.message if result else "")
    text = i18n.t("server.restart_failed", lang, reason=reason)
    gr.Warning(text, duration=TOAST_S)  # the message line keeps saying it
    yield _told(services, f"{result.icon if result else '❌'} {_esc(text)}")


def stop_server(services: AppServices, lang: str) -> tuple[str, dict[str, Any] | None]:
    lang = i18n.normalize(lang)
    if services.server is None:
        return f"⚠️ {i18n.t('chat.off' if services.llm_disabled else 'chat.unavailable', lang)}", None
    services.server.stop()
    text = i18n.t("server.stopped", lang)
    gr.Info(text)
    return _told(services, f"⏹ {_esc(text)}")


def _esc(text: object) -> str:
    """Escape text for Markdown/HTML text (quotes stay readable: no attribute contexts here)."""
    return html.escape(str(text), quote=False)
