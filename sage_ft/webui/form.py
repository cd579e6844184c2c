"""The one generator from ``TrainConfig`` fields to Gradio components, and back.

Each field's widget follows from its type and ``UI`` metadata (bool -> checkbox, choices ->
dropdown, number -> number box, text -> textbox, ``widget="slider"`` -> slider); its label and
help come from the locales (English help = the field's own ``help``), and its allowed range is
appended to the help from the same metadata. No ranges are enforced by the widgets themselves:
form values go back through ``TrainConfig.from_dict``, the only validator, so the UI shows exactly
the message the CLI would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from typing import Any

import gradio as gr

from sage_ft.config import ConfigError, TrainConfig, field_type
from sage_ft.webui import i18n

GROUPS = ("basic", "data", "lora", "advanced", "output")


def names_in(group: str) -> list[str]:
    """Field names of one ``UI.group`` in declaration order."""
    if group not in GROUPS:
        raise ValueError(f"unknown group {group!r}; known: {', '.join(GROUPS)}")
    return [n for n in TrainConfig.field_names() if TrainConfig.ui(n).group == group]


def range_text(name: str) -> str:
    """``" [1 – 1024]"`` from the field's min/max (empty when unbounded)."""
    ui = TrainConfig.ui(name)
    if ui.min is None and ui.max is None:
        return ""
    low = "" if ui.min is None else (f"> {_num(ui.min)}" if ui.min_exclusive else f"≥ {_num(ui.min)}")
    high = "" if ui.max is None else f"≤ {_num(ui.max)}"
    return " [" + ", ".join(p for p in (low, high) if p) + "]"


def info_text(name: str, lang: str) -> str:
    return i18n.field_info(name, lang) + range_text(name)


def field_component(name: str, lang: str, value: Any = None, **override: Any) -> gr.components.Component:
    """Build the component for one config field. ``override`` replaces constructor arguments
    (e.g. the model field becomes a dropdown with the registry's models as choices)."""
    ui = TrainConfig.ui(name)
    kind, optional = field_type(name)
    default = TrainConfig.__dataclass_fields__[name].default
    value = override.pop("value", default if value is None else value)
    common: dict[str, Any] = {"label": i18n.field_label(name, lang), "info": info_text(name, lang),
                              "elem_id": f"cfg-{name}", "value": value}
    widget = override.pop("widget", ui.widget)
    if widget == "dropdown" or (widget is None and ui.choices is not None):
        choices = override.pop("choices", list(ui.choices or []))
        return gr.Dropdown(choices=choices, **{**common, **override})
    if kind is bool:
        return gr.Checkbox(**{**common, **override})
    if kind in (int, float) and widget == "slider":
        return gr.Slider(minimum=ui.min or 0, maximum=ui.max or 1, step=ui.step or (1 if kind is int else 0.01),
                         **{**common, **override})
    if kind in (int, float) and optional:
        # A browser number box cannot be empty (it sends 0), but "empty = unset" is a real value here:
        # a textbox keeps it, and TrainConfig's own coercion turns the text into the number.
        common["value"] = display_value(name, value)
        return gr.Textbox(lines=1, max_lines=1, **{**common, **override})  # the help says what empty means
    if kind in (int, float):
        step = ui.step or (1 if kind is int else _float_step(default))
        return gr.Number(precision=0 if kind is int else None, step=step, **{**common, **override})
    return gr.Textbox(lines=1, max_lines=3, **{**common, **override})


def build_fields(names: Iterable[str], lang: str, registry: Any, prefix: str = "train",
                 overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Create and register (``"<prefix>.<name>"``, locale key ``cfg.<name>``) each field's component."""
    overrides = overrides or {}
    built = {}
    for name in names:
        # A checkbox among number boxes in a row is squeezed to its box's width (its label and help
        # then break a word a line, or vanish): a column of its own keeps the usual minimum width.
        holder = gr.Column(min_width=160) if field_type(name)[0] is bool else contextlib.nullcontext()
        with holder:
            component = field_component(name, lang, **dict(overrides.get(name, {})))
        built[name] = registry.add(f"{prefix}.{name}", component, key=f"cfg.{name}", kind="field")
    return built


def values_to_config(names: Sequence[str], values: Sequence[Any]) -> TrainConfig:
    """Form values (in ``names`` order) -> a validated ``TrainConfig``; raises ``ConfigError``."""
    if len(names) != len(values):
        raise ConfigError([f"form: got {len(values)} values for {len(names)} fields"])
    data = {name: _clean(value) for name, value in zip(names, values, strict=True)}
    config, unknown = TrainConfig.from_dict(data, strict=True)
    return config


def config_to_values(config: TrainConfig, names: Sequence[str]) -> list[Any]:
    """The form values that show ``config`` (in ``names`` order)."""
    data = config.to_dict()
    return [display_value(name, data[name]) for name in names]


def display_value(name: str, value: Any) -> Any:
    """What the field's widget holds for ``value``: optional numbers live in a textbox ('' = unset)."""
    kind, optional = field_type(name)
    if optional and kind in (int, float):
        return "" if value is None else str(value)
    return value


def _clean(value: Any) -> Any:
    """Widgets send '' for an empty textbox and None for an empty number; both mean 'unset'."""
    if isinstance(value, str):
        return value.strip()
    return value


def _float_step(default: Any) -> float:
    if isinstance(default, float) and 0 < default < 0.01:
        return default / 2
    return 0.01 if isinstance(default, float) and default < 1 else 0.1


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
