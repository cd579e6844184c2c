"""Export tab (placeholder): merge / GGUF export arrives with the Export issue.

Registers its texts so the language switch and the locale test cover it; the real tab replaces
``build``/``wire`` and keeps the ``export.*`` ids.
"""

from __future__ import annotations

import gradio as gr

from sage_ft.webui import i18n
from sage_ft.webui.components import Registry
from sage_ft.webui.services import AppServices


def build(reg: Registry, services: AppServices, lang: str) -> None:
    reg.add("export.placeholder", gr.Markdown(i18n.t("export.placeholder", lang)))


def wire(reg: Registry, services: AppServices) -> None:
    """Nothing to wire yet."""
