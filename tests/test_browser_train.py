"""One real browser session (Playwright + Debian Chromium, headless) over the whole Train flow.

Loads the page, uploads a spreadsheet's CSV (its own column names: the report's suggested reading is
applied with one click) through the file chooser, starts a run on the demo model,
watches the progress bar and the loss chart update, reloads mid-run and finds the same run still
going (its log showing the newest lines), switches the language, and saves a screenshot of each
tab under ``test-artifacts/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sage_ft import paths
from sage_ft.tasks import TaskStatus
from tests.fixtures_data import MEMORIZE_PAIRS, write_table
from tests.fixtures_webui import start_webui

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = paths.project_root() / "test-artifacts"
# Far more steps than the test lasts: the run must still be going when the test reloads and cancels it
# (400 steps once finished first, on a quiet machine).
MAX_STEPS = "20000"


@pytest.fixture(scope="module")
def browser_app(demo_model, tmp_path_factory):
    app = start_webui(tmp_path_factory.mktemp("browser"))
    yield app
    app.close()


# The run's log box: overflowing (taller than its box by px) and showing its last line.
LOG_OVERFLOWS = """([sel, px]) => { const b = document.querySelector(sel);
                                     return b !== null && b.scrollHeight > b.clientHeight + px; }"""
LOG_AT_END = """(sel) => { const b = document.querySelector(sel);
                           return b !== null && b.clientHeight > 0 && b.scrollHeight > b.clientHeight
                                  && b.scrollTop + b.clientHeight >= b.scrollHeight - 8; }"""

# A chart's legend shown, and below its x axis's title.
LEGEND_BELOW_AXIS_TITLE = """(chart) => { const legend = document.querySelector(chart + ' .legend'),
                                                title = document.querySelector(chart + ' .xtitle');
    if (!legend || !title || !legend.getBoundingClientRect().height) return false;
    return legend.getBoundingClientRect().top >= title.getBoundingClientRect().bottom; }"""

# Every chart in sight drawn at its box's width (one drawn while its tab was hidden took plotly's 700 px
# default and was cut off once the tab showed).
CHARTS_FIT = """() => { const shown = [...document.querySelectorAll('#tab-monitor .js-plotly-plot')]
                                    .filter(p => p.offsetWidth > 0);
    return shown.length === 3 && shown.every(p => p._fullLayout
                                              && Math.abs(p._fullLayout.width - p.offsetWidth) <= 1); }"""

# Form fields whose label runs past their box's right edge (long config keys in narrow columns).
LABELS_OVERFLOWING = """() => [...document.querySelectorAll('[id^="cfg-"]')].filter(b => b.offsetParent !== null)
    .filter(b => [...b.querySelectorAll('[data-testid="block-info"]')]
                 .some(l => l.getBoundingClientRect().right > b.getBoundingClientRect().right + 1)).map(b => b.id)"""


def _step(page) -> int:
    value = page.locator("#mon-progress .sage-progress").get_attribute("data-step")
    return int(value or 0)


def test_train_monitor_reload_and_language_in_a_real_browser(browser_app, tmp_path, browser):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    dataset = write_table([{"Question": q, "Answer": a} for q, a in MEMORIZE_PAIRS] * 4, tmp_path / "browser-data.csv")
    try:
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(browser_app.url)
        expect(page.get_by_role("button", name="▶ Start training")).to_be_visible()
        expect(page.locator("#cfg-model_name_or_path input")).to_have_value(re.compile("demo"))
        page.get_by_role("tab", name="📈 Monitor").click()  # an empty list says how a run gets there
        expect(page.locator("#mon-progress")).to_contain_text("No runs yet: start one on the 🚀 Train tab")
        page.get_by_role("tab", name="🚀 Train").click()  # (the Monitor's charts are now drawn while hidden)

        with page.expect_file_chooser() as chooser:
            page.locator("#dataset-upload").get_by_text("Click to Upload").click()
        chooser.value.set_files(str(dataset))
        expect(page.locator("#cfg-dataset textarea")).to_have_value(re.compile(r"uploads/.*browser-data\.csv"))
        expect(page.locator("#data-report")).to_contain_text("instruction=Question,output=Answer")
        page.locator("#apply-reading").click()  # the reading the report suggests, in one click
        expect(page.locator("#data-report")).to_contain_text("16 usable rows of 16 read")
        expect(page.locator("#apply-reading")).to_be_hidden()
        expect(page.locator(".sage-preview .role-assistant").first).to_be_visible()

        page.get_by_role("button", name="Data options").click()  # collapsed by default
        expect(page.locator("#cfg-column_mapping input, #cfg-column_mapping textarea")).to_have_value(
            "instruction=Question,output=Answer")
        page.get_by_role("button", name="Advanced settings").click()
        for field, value in (("max_steps", MAX_STEPS), ("cutoff_len", "64"), ("per_device_train_batch_size", "2"),
                             ("save_steps", "1000")):
            box = page.locator(f"#cfg-{field} input")
            box.fill(value)
            box.press("Tab")
        expect(page.locator("#command-preview")).to_contain_text(f"max_steps={MAX_STEPS}")
        page.screenshot(path=str(ARTIFACTS / "train-tab.png"), full_page=True)
        assert page.evaluate(LABELS_OVERFLOWING) == []
        # checkboxes among the number boxes keep a readable width (they were squeezed to ~20 px,
        # their labels gone and their help a word a line)
        for checkbox in ("gradient_checkpointing", "torch_compile", "merge_lora"):
            assert page.locator(f"#cfg-{checkbox}").bounding_box()["width"] >= 150, checkbox

        page.get_by_role("button", name="▶ Start training").click()
        expect(page.locator("#train-message")).to_contain_text("is queued")
        task_id = int(page.locator("#train-task-id input").input_value())
        browser_app.services.tasks.wait(task_id, timeout=120, until={TaskStatus.RUNNING})
        # the run's curves are drawn while the Train tab shows
        expect(page.locator("#loss-chart .scatterlayer .trace").first).to_be_attached(timeout=90_000)

        page.get_by_role("tab", name="📈 Monitor").click()
        page.wait_for_function(CHARTS_FIT, timeout=10_000)
        expect(page.locator("#task-table")).to_contain_text("running")
        expect(page.locator("#mon-progress .sage-progress")).to_have_attribute("data-task", str(task_id))
        expect(page.locator("#loss-chart .scatterlayer .trace").first).to_be_attached(timeout=90_000)
        first = _step(page)
        expect(page.locator("#mon-progress .sage-progress")).not_to_have_attribute("data-step", str(first),
                                                                                    timeout=90_000)
        assert _step(page) > first
        # the legend sits below the x axis's title (it was drawn over it); read in one go in the page, which
        # redraws the chart on every tick of the running task
        page.wait_for_function(LEGEND_BELOW_AXIS_TITLE, arg="#loss-chart", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "monitor-tab.png"), full_page=True)
        # More log than Gradio's own autoscroll follows when it arrives in one piece (100 px)
        page.wait_for_function(LOG_OVERFLOWS, arg=["#task-log textarea", 200], timeout=90_000)

        page.reload()  # the run lives in the app, not the page
        expect(page.locator("#train-task-id input")).to_have_value(str(task_id))
        expect(page.locator("#train-progress")).to_contain_text("running")
        # ... and the form as it was left lives in this browser
        expect(page.locator("#cfg-max_steps input")).to_have_value(MAX_STEPS)
        expect(page.locator("#cfg-per_device_train_batch_size input")).to_have_value("2")
        expect(page.locator("#cfg-dataset textarea")).to_have_value(re.compile(r"uploads/.*browser-data\.csv"))
        expect(page.locator("#command-preview")).to_contain_text(f"max_steps={MAX_STEPS}")
        page.get_by_role("tab", name="📈 Monitor").click()
        expect(page.locator("#mon-progress .sage-progress")).to_have_attribute("data-task", str(task_id))
        page.wait_for_function(LOG_AT_END, arg="#task-log textarea", timeout=30_000)  # the newest lines
        after_reload = _step(page)
        assert after_reload >= first
        expect(page.locator("#mon-progress .sage-progress")).not_to_have_attribute(
            "data-step", str(after_reload), timeout=90_000)
        assert browser_app.services.tasks.task(task_id).status is TaskStatus.RUNNING

        page.locator("#lang-select input").click()
        page.get_by_role("option", name="中文").click()
        expect(page.get_by_role("tab", name="📈 监控")).to_be_visible()
        expect(page.locator("#task-table")).to_contain_text("运行中")
        page.screenshot(path=str(ARTIFACTS / "monitor-tab-zh.png"), full_page=True)
        for name, file in (("💬 对话", "chat-tab-zh.png"), ("📦 导出", "export-tab-zh.png"),
                           ("🚀 训练", "train-tab-zh.png")):
            page.get_by_role("tab", name=name).click()
            page.wait_for_timeout(500)
            page.screenshot(path=str(ARTIFACTS / file), full_page=True)
        expect(page.get_by_role("button", name="▶ 开始训练")).to_be_visible()

        page.get_by_role("button", name="⏹ 取消").first.click()
        assert browser_app.services.tasks.wait(task_id, timeout=120).status is TaskStatus.CANCELLED
        expect(page.locator("#train-progress")).to_contain_text("已取消")

        page.get_by_role("button", name="↺ 恢复默认").click()  # the form back to its defaults, remembered too
        expect(page.locator("#cfg-max_steps input")).to_have_value("-1")
        expect(page.locator("#command-preview")).not_to_contain_text("max_steps")
        page.wait_for_timeout(1000)  # the stored draft follows the change events
        page.reload()
        expect(page.locator("#cfg-dataset textarea")).to_have_value("")
        expect(page.locator("#cfg-max_steps input")).to_have_value("-1")
        expect(page.get_by_role("tab", name="🚀 训练")).to_be_visible()  # the language picked, kept too
        expect(page.get_by_role("button", name="▶ 开始训练")).to_be_visible()
    finally:
        browser.close()
    for file in ("train-tab.png", "monitor-tab.png", "chat-tab-zh.png", "export-tab-zh.png"):
        assert (ARTIFACTS / file).stat().st_size > 10_000, file
    assert Path(ARTIFACTS / "monitor-tab.png").exists()


def test_a_first_visit_follows_the_browsers_language_unless_the_app_sets_one(demo_model, tmp_path, browser):
    """Started without --lang, a page opens in the browser's own language (a Chinese browser: 中文);
    with --lang en it opens in English whatever the browser prefers."""
    from playwright.sync_api import expect

    follows, fixed = start_webui(tmp_path / "follows", start_worker=False, lang=None), \
        start_webui(tmp_path / "fixed", start_worker=False, lang="en")
    try:
        try:
            for app, tab in ((follows, "🚀 训练"), (fixed, "🚀 Train")):
                page = browser.new_context(locale="zh-CN").new_page()  # a fresh storage each
                page.goto(app.url)
                expect(page.get_by_role("tab", name=tab)).to_be_visible(timeout=30_000)
        finally:
            browser.close()
    finally:
        follows.close()
        fixed.close()
