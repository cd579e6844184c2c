"""Chat tab (placeholder): the chat with the served model arrives with the Chat issue.

It already registers its tab-level texts so the language switch and the locale test cover it;
the real tab replaces ``build``/``wire`` and keeps the ``chat.*`` ids.
"""

from __future__ import annotations

import gradio as gr

from sage_ft.webui import i18n
from sage_ft.webui.components import Registry
from sage_ft.webui.services import AppServices


def build(reg: Registry, services: AppServices, lang: str) -> None:
    reg.add("chat.placeholder", gr.Markdown(i18n.t("chat.placeholder", lang)))


def wire(reg: Registry, services: AppServices) -> None:
    """Nothing to wire yet."""
