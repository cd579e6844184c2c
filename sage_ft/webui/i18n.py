"""UI strings in English and Chinese, read from ``locales/<lang>.yaml``.

Locales are data: keys like ``train.start`` or ``alert.no_dataset``. Config fields use
``cfg.<field>.label`` and ``cfg.<field>.info``; the English help of a field is *not* copied into
``en.yaml`` — it comes from the field's own metadata (``TrainConfig.ui(name).help``), the one place
that fact is declared. ``zh.yaml`` translates both. ``tests/test_locales.py`` keeps the key sets equal.
Facts that are not words are not copied into locales either: a text writes ``{file_types}`` where
the readable dataset file types go, filled in from ``sage_ft.data.load.FILE_TYPES`` as it is read.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml

from sage_ft import paths
from sage_ft.config import TrainConfig
from sage_ft.data.load import FILE_TYPES

FACTS = {"{file_types}": FILE_TYPES}  # placeholders any locale text may hold, and their values

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
    return {key: _with_facts(text) for key, text in out.items()}


def _with_facts(text: str) -> str:
    for placeholder, value in FACTS.items():
        text = text.replace(placeholder, value)
    return text


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


# The language picked on a page, kept in the browser's localStorage under LANG_STORAGE_KEY (plain text:
# nothing private), and the JavaScript the page runs on load to open in it.
KEEP_LANG_JS = f"(lang) => {{ try {{ localStorage.setItem('{LANG_STORAGE_KEY}', lang); }} catch (e) {{}} }}"


def opening_lang_js(follow_browser: bool) -> str:
    """The page's load-time choice of language: the one picked last in this browser, else (when
    ``follow_browser``: the app was started without --lang) the first of the browser's own preferred
    languages we have, else the language the page was built in."""
    langs = "[" + ", ".join(f"'{code}'" for code in LANGS) + "]"
    return f"""(current) => {{
        const langs = {langs};
        let kept = null;
        try {{ kept = localStorage.getItem('{LANG_STORAGE_KEY}'); }} catch (e) {{}}
        if (langs.includes(kept)) return kept;
        if ({'true' if follow_browser else 'false'}) {{
            for (const tag of (navigator.languages || [navigator.language])) {{
                const code = String(tag || '').split('-')[0].toLowerCase();
                if (langs.includes(code)) return code;
            }}
        }}
        return current;
    }}"""
