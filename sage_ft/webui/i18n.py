"""UI strings in English and Chinese, read from ``locales/<lang>.yaml``.

Locales are data: keys like ``train.start`` or ``alert.no_dataset``. Config fields use
``cfg.<field>.label`` and ``cfg.<field>.info``; the English help of a field is *not* copied into
``en.yaml`` — it comes from the field's own metadata (``TrainConfig.ui(name).help``), the one place
that fact is declared. ``zh.yaml`` translates both. ``tests/test_locales.py`` keeps the key sets equal.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from sage_ft import paths
from sage_ft.config import TrainConfig

LANGS = ("en", "zh")
DEFAULT_LANG = "en"
LANG_NAMES = {"en": "English", "zh": "中文"}
LANG_STORAGE_KEY = "sage-ft-lang"  # the browser's storage entry for the language picked on the page


def locales_dir() -> Path:
    return paths.project_root() / "locales"


@cache
def file_strings(lang: str) -> dict[str, str]:
    """The flat ``key -> text`` mapping exactly as written in ``locales/<lang>.yaml``."""
    path = locales_dir() / f"{lang}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of key: text")
    return {str(k): str(v) for k, v in data.items()}


@cache
def strings(lang: str) -> dict[str, str]:
    """All strings of a language; English adds each config field's help from its metadata."""
    lang = lang if lang in LANGS else DEFAULT_LANG
    out = dict(file_strings(lang))
    if lang == "en":
        for name in TrainConfig.field_names():
            out.setdefault(f"cfg.{name}.info", TrainConfig.ui(name).help)
    return out


def t(key: str, lang: str = DEFAULT_LANG, **values: Any) -> str:
    """The text for ``key`` (English when the language lacks it, the key itself as a last resort)."""
    text = strings(lang).get(key) or strings(DEFAULT_LANG).get(key) or key
    return text.format(**values) if values else text


def field_label(name: str, lang: str) -> str:
    """A field's label, followed by its YAML key / CLI name so the form teaches the CLI."""
    return f"{t(f'cfg.{name}.label', lang)} ({name})"


def field_info(name: str, lang: str) -> str:
    return t(f"cfg.{name}.info", lang)


def normalize(lang: str | None) -> str:
    return lang if lang in LANGS else DEFAULT_LANG


def page_lang(chosen: Any, accept_language: str | None) -> str | None:
    """The language a page opens in when the app was not started with ``--lang``: the one this browser
    chose last (``chosen``, kept in its storage), else the first of the browser's own preferred
    languages (its Accept-Language header, by quality) that we have; None: the app's default."""
    if chosen in LANGS:
        return chosen
    preferred = []
    for position, item in enumerate((accept_language or "").split(",")):
        tag, _, params = item.strip().partition(";")
        quality = 1.0
        for param in params.split(";"):
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if tag:
            preferred.append((-quality, position, tag.split("-")[0].lower()))
    return next((code for _, _, code in sorted(preferred) if code in LANGS and code), None)
