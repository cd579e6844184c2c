"""Both locale files hold the same keys, and every key the page uses exists in both."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from sage_ft.config import TrainConfig
from sage_ft.tasks import TaskStatus
from sage_ft.webui import i18n, render
from sage_ft.webui.app import build_app
from sage_ft.webui.services import AppServices

WEBUI_DIR = Path(i18n.__file__).parent


def test_both_locale_files_have_the_same_keys_and_no_empty_text():
    en, zh = i18n.strings("en"), i18n.strings("zh")
    assert set(en) - set(zh) == set(), f"missing in zh.yaml: {sorted(set(en) - set(zh))}"
    assert set(zh) - set(en) == set(), f"missing in en.yaml: {sorted(set(zh) - set(en))}"
    assert [k for k, v in {**en, **zh}.items() if not v.strip()] == []


def test_the_dataset_file_types_come_from_the_reader_only():
    """The locales write ``{file_types}``; what the page shows is the reader's own list."""
    from sage_ft.data.load import FILE_TYPES, SUFFIXES

    for lang in i18n.LANGS:
        texts = i18n.strings(lang)
        assert [k for k, v in texts.items() if "{file_types}" in v] == []
        for key in ("train.upload", "alert.no_dataset", "cfg.dataset.info"):
            assert FILE_TYPES in texts[key] and all(suffix in texts[key] for suffix in SUFFIXES)
        raw = (i18n.locales_dir() / f"{lang}.yaml").read_text(encoding="utf-8")
        assert ".tsv" not in raw, f"{lang}.yaml names a file type: write {{file_types}}"


def test_english_help_comes_from_the_config_metadata_only():
    raw_en = yaml.safe_load((i18n.locales_dir() / "en.yaml").read_text(encoding="utf-8"))
    assert not [k for k in raw_en if k.endswith(".info") and k.startswith("cfg.")], "en help belongs in config.py"
    for name in TrainConfig.field_names():
        assert i18n.t(f"cfg.{name}.info", "en") == TrainConfig.ui(name).help
        assert f"cfg.{name}.label" in raw_en
        assert i18n.t(f"cfg.{name}.info", "zh") != TrainConfig.ui(name).help, f"{name}: help not translated"


def test_every_key_the_page_registers_exists(tmp_path):
    from sage_ft.tasks import TaskManager

    services = AppServices(tasks=TaskManager(tmp_path / "t.db", start_worker=False), configs_dir=tmp_path)
    try:
        demo = build_app(services)
        used = demo.registry.locale_keys()
    finally:
        services.tasks.shutdown()
    assert used, "the registry reported no keys"
    for lang in i18n.LANGS:
        missing = sorted(k for k in used if k not in i18n.strings(lang))
        assert missing == [], f"{lang}: keys used by the page but missing: {missing}"


def test_every_literal_key_in_the_code_exists():
    """Keys written in the handlers' source (``i18n.t("alert.x", ...)``) and the computed families."""
    pattern = re.compile(r"""i18n\.t\(\s*["']([a-z_]+\.[a-z0-9_.]+)["']""")
    keys = set()
    for path in WEBUI_DIR.glob("*.py"):
        keys |= set(pattern.findall(path.read_text(encoding="utf-8")))
    keys |= {f"status.{s.value}" for s in TaskStatus}
    keys |= {f"mon.col.{c}" for c in render.TABLE_COLUMNS}
    keys |= {f"alert.task_{a}" for a in ("cancel", "resume", "retry")}
    keys |= {f"{report}.{verdict}" for report in ("data", "data.eval") for verdict in ("ok", "not_ok")}
    assert len(keys) > 40
    for lang in i18n.LANGS:
        assert sorted(k for k in keys if k not in i18n.strings(lang)) == [], lang
