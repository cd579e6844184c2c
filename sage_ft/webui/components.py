"""A small registry of the page's components, keyed ``"tab.elem"`` (as LLaMA-Factory's Manager).

Tabs register what they build; the registry then knows which components carry translatable text
and how (a button's text is its value, an input has a label and help, a tab has a label), so one
handler can switch the whole page's language at runtime. Config fields are registered as
``"train.<field name>"`` and take their texts from ``cfg.<field>.label`` / ``cfg.<field>.info``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import gradio as gr

from sage_ft.config import TrainConfig
from sage_ft.webui import i18n

Kind = Literal["field", "value", "label", "label_info", "none"]

# Seconds a warning toast stays. Never "until closed" (duration=None): a toast that stays covers the
# buttons under it (Switch, Cancel switch); the message line beside the action keeps saying it.
TOAST_S = 8


def page_stamp() -> gr.Textbox:
    """A fingerprint of what the page shows (the page tick skips a redraw while it is unchanged), held
    by the page itself: a hidden textbox, sent with each tick and written in the same message as the
    display it describes. A ``gr.State`` is kept on the server and written when its event ends, apart
    from the message that redraws the page: a tick in flight at a click could draw its (older) details
    last while the click's stamp was stored last, and every later tick then found that stamp current and
    skipped; the details ignored the pick until that task changed (a finished one never does; seen in CI).
    """
    return gr.Textbox(None, visible=False)


def forget_stamps(event: Any, *stamps: gr.Textbox) -> None:
    """Once ``event`` has drawn what ``stamps`` describe without writing them (a Start, Cancel or
    Resume draws the Train tab's bar; a page load re-attaches), empty them: the next tick then draws
    anew. The event's answer may land after a tick that had drawn a newer state with its stamp (the
    Cancel's "running" after the tick's "cancelled"), and the page kept the older drawing under the
    newer stamp, every later tick skipping it (seen in CI: the bar stayed on "running" after a cancel)."""
    empty = (lambda: None) if len(stamps) == 1 else (lambda: (None,) * len(stamps))  # Gradio: one output, one value
    event.then(empty, None, list(stamps), api_name=False, show_progress="hidden")


@dataclass
class Entry:
    elem_id: str
    component: Any
    key: str
    kind: Kind


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def add(self, elem_id: str, component: Any, *, key: str | None = None, kind: Kind | None = None) -> Any:
        """Register ``component`` under ``elem_id``; ``key`` is its locale key (default: ``elem_id``)."""
        if elem_id in self._entries:
            raise ValueError(f"component id {elem_id!r} registered twice")
        if kind is None:
            kind = _default_kind(component)
        self._entries[elem_id] = Entry(elem_id, component, key or elem_id, kind)
        return component

    def __getitem__(self, elem_id: str) -> Any:
        try:
            return self._entries[elem_id].component
        except KeyError:
            raise KeyError(f"no component {elem_id!r}; registered: {', '.join(self._entries)}") from None

    def __contains__(self, elem_id: str) -> bool:
        return elem_id in self._entries

    def ids(self) -> list[str]:
        return list(self._entries)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def config_fields(self, prefix: str = "train") -> dict[str, Any]:
        """``{field name: component}`` for every TrainConfig field registered under ``prefix``."""
        out = {}
        for name in TrainConfig.field_names():
            elem_id = f"{prefix}.{name}"
            if elem_id in self._entries:
                out[name] = self._entries[elem_id].component
        return out

    def localized(self) -> list[Entry]:
        return [e for e in self._entries.values() if e.kind != "none"]

    def locale_keys(self) -> set[str]:
        """Every locale key the registered components use (the locale test checks they exist)."""
        keys: set[str] = set()
        for entry in self.localized():
            if entry.kind == "field":
                keys |= {f"{entry.key}.label", f"{entry.key}.info"}
            elif entry.kind == "label_info":
                keys |= {entry.key, f"{entry.key}.info"}
            else:
                keys.add(entry.key)
        return keys

    def relabel(self, lang: str) -> list[Any]:
        """One ``gr.update`` per localized component (same order as ``localized()``)."""
        updates = []
        for entry in self.localized():
            if entry.kind == "field":
                name = entry.key.removeprefix("cfg.")
                updates.append(gr.update(label=i18n.field_label(name, lang), info=i18n.field_info(name, lang)))
            elif entry.kind == "value":
                updates.append(gr.update(value=i18n.t(entry.key, lang)))
            elif entry.kind == "label_info":
                updates.append(gr.update(label=i18n.t(entry.key, lang), info=i18n.t(f"{entry.key}.info", lang)))
            else:
                updates.append(gr.update(label=i18n.t(entry.key, lang)))
        return updates


def _default_kind(component: Any) -> Kind:
    if isinstance(component, (gr.DownloadButton, gr.UploadButton)):
        return "label"  # their text is the label
    if isinstance(component, (gr.Button, gr.Markdown)):
        return "value"
    return "label"
