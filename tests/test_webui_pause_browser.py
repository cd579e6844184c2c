"""Pause, the Task box and the Monitor's download in a real browser (Playwright + Debian Chromium), with
real runs on the demo model: what the tester saw ('🔄 running · 0%' for a paused run, no way to unpause,
a downloaded file still offered for another task, '2.5' acting on task 2) is checked on the page itself."""

from __future__ import annotations

import re
import time

import pytest

from sage_ft import paths
from sage_ft.tasks import TaskStatus, rundir
from tests.fixtures_data import memorize_rows, write_jsonl
from tests.fixtures_tasks import tiny_task_config
from tests.fixtures_webui import start_webui

pytestmark = [pytest.mark.browser, pytest.mark.slow]
ARTIFACTS = paths.project_root() / "test-artifacts"


def _wait(what, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.3)


def test_pause_unpause_task_box_and_download_in_a_real_browser(demo_model, tmp_path, browser):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    app = start_webui(tmp_path / "app")
    tasks = app.services.tasks
    dataset = write_jsonl(memorize_rows() * 2, tmp_path / "pause-browser.jsonl")
    done = tasks.create(tiny_task_config(dataset, max_steps=2), name="done run")
    long = short = resumable = None
    try:
        assert tasks.wait(done.id, timeout=240).status is TaskStatus.COMPLETED
        resumable = tasks.create(tiny_task_config(dataset, max_steps=400, save_steps=2), name="resumable run")
        _wait(lambda: len(rundir.checkpoint_folders(resumable.output_dir)) >= 2)
        tasks.cancel(resumable.id)
        assert tasks.wait(resumable.id, timeout=120).status is TaskStatus.CANCELLED
        older = rundir.checkpoint_folders(resumable.output_dir)[0].name  # oldest first
        long = tasks.create(tiny_task_config(dataset, max_steps=3000, save_steps=1000), name="long run")
        short = tasks.create(tiny_task_config(dataset, max_steps=3), name="short run")
        _wait(lambda: tasks.task(long.id).step >= 1)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(app.url)
            page.get_by_role("tab", name="📈 Monitor").click()
            progress, table, offered = (page.locator(s) for s in ("#mon-progress", "#task-table", "#task-file"))
            pause, unpause = page.get_by_role("button", name="⏸ Pause"), page.get_by_role("button", name="▶ Unpause")

            # the page re-attaches to the running task first (a pick made before that is overwritten)
            expect(progress.locator(".sage-progress")).to_have_attribute("data-task", str(long.id))
            # a file downloaded for one task is not offered once another is picked
            # (visible=true: a hidden sizing row of the table may hold the same text). In 3 of 11 fresh-clone
            # runs the details did not follow this pick: the picker showed it, the progress stayed on the
            # running task, frozen. The likely cause, fixed since: the tick's fingerprint was server-side
            # state, stored apart from the details it described (see components.page_stamp). Where it
            # fails, the message says what the picker holds by then.
            table.locator("text=done run >> visible=true").first.click()
            picker = page.locator("#task-select input")
            expect(picker).to_have_value(re.compile(rf"^#{done.id} "))
            try:
                expect(progress.locator(".sage-progress")).to_have_attribute("data-task", str(done.id))
            except AssertionError as exc:
                raise AssertionError(f"the pick of #{done.id} did not reach the details; the picker now shows "
                                     f"{picker.input_value()!r}\n{exc}") from None
            expect(pause).to_be_disabled()  # a finished task: in sight, but off
            cancel, resume = page.get_by_role("button", name="⏹ Cancel"), page.get_by_role("button", name="⏯ Resume")
            expect(cancel).to_be_disabled()  # and so is what it does not allow; Retry (run it again) is on
            expect(resume).to_be_disabled()
            expect(page.get_by_role("button", name="🔁 Retry")).to_be_enabled()
            page.get_by_role("button", name="⬇️ Download full log").click()
            expect(offered).to_be_visible()
            expect(offered.get_by_role("link")).to_have_attribute("href", re.compile(f"/task-{done.id}-logs.txt$"))
            # a cancelled run resumes from a checkpoint picked beside ⏯ Resume (newest by default)
            picker = page.locator("#resume-from")
            expect(picker).to_be_hidden()  # a finished run has nothing to resume
            table.locator("text=resumable run >> visible=true").first.click()  # (also in a hidden sizing row)
            expect(picker).to_be_visible()
            expect(resume).to_be_enabled()
            expect(picker.locator("input")).to_have_value(re.compile(r"^the newest intact checkpoint \(checkpoint-"))
            picker.locator("input").click()
            page.get_by_role("option", name=older, exact=True).click()
            page.screenshot(path=str(ARTIFACTS / "monitor-resume-from.png"), full_page=True)
            resume.click()
            expect(page.get_by_text(f"will continue from {older}").first).to_be_visible()
            _wait(lambda: tasks.task(resumable.id).status is TaskStatus.QUEUED)
            assert [c.name for c in rundir.checkpoint_folders(resumable.output_dir)] == [older]  # newer set aside
            expect(picker).to_be_hidden()  # queued again: nothing to resume
            table.get_by_text("long run").click()
            expect(progress.locator(".sage-progress")).to_have_attribute("data-task", str(long.id))
            expect(offered).to_be_hidden()

            # ⏸ Pause: the state shows in the progress and the table, the queued task says why it waits
            expect(pause).to_be_enabled()
            expect(unpause).to_be_hidden()
            pause.click()
            expect(progress).to_contain_text("🔄 running ⏸ paused")
            expect(progress).to_contain_text("paused after step")
            expect(progress).not_to_contain_text("ETA")
            expect(unpause).to_be_visible()
            expect(pause).to_be_hidden()
            expect(table).to_contain_text("🔄 running ⏸ paused")
            expect(table).to_contain_text(f"waits for #{long.id}, which is paused")
            page.screenshot(path=str(ARTIFACTS / "monitor-paused.png"), full_page=True)

            # the Train tab: its Task box refuses '2.4' instead of acting on task 2
            page.get_by_role("tab", name="🚀 Train").click()
            box = page.locator("#train-task-id input")
            train_cancel, train_resume = page.locator("#train-cancel"), page.locator("#train-resume")
            box.fill(str(done.id))  # a finished task: neither to cancel nor to resume
            expect(page.locator("#train-progress")).to_contain_text("completed")
            expect(train_cancel).to_be_disabled()
            expect(train_resume).to_be_disabled()
            box.fill(str(long.id))
            expect(page.locator("#train-progress")).to_contain_text("⏸ paused")
            expect(page.locator("#train-progress")).not_to_contain_text("ETA")
            expect(train_cancel).to_be_enabled()  # a running (paused) task can be cancelled
            expect(train_resume).to_be_disabled()
            typed = f"{short.id}.4"
            box.fill(typed)
            expect(page.locator("#train-progress")).to_contain_text(f"'{typed}' is not a task id")
            expect(train_cancel).to_be_disabled()  # the handlers refuse it too: tests/test_webui_pause.py
            assert tasks.task(short.id).status is TaskStatus.QUEUED

            # ▶ Unpause: it trains again, and in Chinese the buttons and state read so too
            page.get_by_role("tab", name="📈 Monitor").click()
            held = progress.locator(".sage-progress").get_attribute("data-step")
            unpause.click()
            expect(progress).not_to_contain_text("⏸")
            expect(pause).to_be_visible()
            expect(progress.locator(".sage-progress")).not_to_have_attribute("data-step", held or "", timeout=90_000)
            page.locator("#lang-select input").click()
            page.get_by_role("option", name="中文").click()
            expect(page.get_by_role("button", name="⏸ 暂停")).to_be_enabled()
            page.get_by_role("button", name="⏸ 暂停").click()
            expect(progress).to_contain_text("已暂停")
            expect(page.get_by_role("button", name="▶ 取消暂停")).to_be_visible()
            expect(table).to_contain_text(re.compile(f"等待已暂停的任务 #{long.id}"))
        finally:
            browser.close()
    finally:
        for task in (long, short, resumable):
            if task is not None and not tasks.task(task.id).status.is_final:
                tasks.cancel(task.id)
        app.close()
