"""The whole loop in a real browser (Debian Chromium via Playwright) on the demo model and the session's
real vLLM server: upload a memorisation set -> train -> ✅ -> "Use as chat backend" -> ✅ toast -> the
chat answers a training prompt with the trained answer (the base model does not) -> back to the base ->
the answer changes -> export -> the merged model is listed. A screenshot of each step goes to
``test-artifacts/e2e/``; the chat one is also copied to ``docs/screenshot-chat.png``.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sage_ft.webui.chat_memory import SETTINGS_KEY, STORAGE_KEY
from sage_ft.webui.chat_messages import RUNNING
from tests.fixtures_serving import server_held
from tests.fixtures_training import MEMORIZE_QA
from tests.fixtures_webui import start_webui

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "e2e"
QUESTION, ANSWER = MEMORIZE_QA[0]  # "What is the secret word?" -> "The secret word is pineapple."
KEYWORD = "pineapple"
# Settings that make the demo model memorise 4 pairs in ~40 steps (as tests/fixtures_training.py does);
# rank 16 stays within the chat server's --max-lora-rank, so the adapter is loaded at runtime.
RUN_CONFIG = {"model_name_or_path": "demo", "learning_rate": 5e-3, "lora_rank": 16, "per_device_train_batch_size": 4,
              "max_steps": 40, "save_steps": 20, "logging_steps": 5, "precision": "fp32", "devices": "cpu",
              "cutoff_len": 256, "run_name": "e2e-memorize"}
LONG = 240_000  # ms: training / exports on 2 shared cores


@pytest.fixture
def e2e_app(vllm_manager, tmp_path):
    (tmp_path / "app" / "configs").mkdir(parents=True)  # the app's configs_dir (see start_webui)
    (tmp_path / "app" / "configs" / "e2e.yaml").write_text(yaml.safe_dump(RUN_CONFIG), encoding="utf-8")
    app = start_webui(tmp_path / "app", server=vllm_manager)
    yield app
    app.close()
    if vllm_manager.status()["model"] != "demo":
        assert vllm_manager.switch("demo").outcome == "live"


def _pick(page, dropdown, option: str | re.Pattern, tries: int = 6, click: bool = True) -> None:
    """Open a dropdown (its input locator) and click an option; reopens while its choices are refreshed."""
    for attempt in range(tries):
        dropdown.click()
        choice = page.get_by_role("option", name=option).first
        try:
            choice.wait_for(state="visible", timeout=10_000)
        except Exception:
            if attempt == tries - 1:
                raise
            page.keyboard.press("Escape")
            continue
        if click:
            choice.click()
        return


def _bot_reply(page) -> str:
    return page.locator("#chatbot [data-testid=bot]").last.inner_text()


def _ask(page, question: str) -> str:
    """Send ``question`` in a cleared chat; returns the reply once it stopped changing. Only a chat with
    messages is cleared, and the question is typed once they are gone: on an empty chat nothing shows
    when the Clear has landed, and one landing after the Send could stop the new reply."""
    from playwright.sync_api import expect

    messages = page.locator("#chatbot [data-testid=user], #chatbot [data-testid=bot]")
    if messages.count():
        page.locator("#chat-clear").click()
        expect(messages).to_have_count(0, timeout=30_000)
    page.locator("#chat-input textarea").fill(question)
    page.locator("#chat-send").click()
    expect(page.locator("#chatbot [data-testid=bot]")).to_have_count(1, timeout=120_000)
    expect(page.locator("#chatbot [data-testid=bot]").last).not_to_be_empty(timeout=120_000)
    # Done = unchanged over 10 reads spanning 3 s. Counting reads, not only seconds: while vLLM generates,
    # this test can go unscheduled for seconds (docs/reliability.md), and a stall must not pass for "stable".
    last, same_reads, stable_since = None, 0, time.monotonic()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = _bot_reply(page)
        if text != last:
            last, same_reads, stable_since = text, 0, time.monotonic()
        else:
            same_reads += 1
            if same_reads >= 10 and time.monotonic() - stable_since >= 3.0:
                return last or ""
        page.wait_for_timeout(300)
    raise AssertionError(f"the reply was still changing after 180 s: {last!r}")


def test_train_chat_switch_and_export_in_a_browser(e2e_app, tmp_path, browser):
    from playwright.sync_api import expect

    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    data = tmp_path / "memorise.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant",
                                                                                      "content": a}]}) + "\n"
                            for q, a in MEMORIZE_QA), encoding="utf-8")
    page = browser.new_context(viewport={"width": 1400, "height": 1000},
                               permissions=["clipboard-read", "clipboard-write"]).new_page()
    page.set_default_timeout(60_000)
    try:
        page.goto(e2e_app.url)
        # 1. the run's settings from a saved config, then the dataset by file upload
        _pick(page, page.get_by_label("Saved configs"), "e2e.yaml")
        page.get_by_role("button", name="📂 Load config").click()
        expect(page.get_by_text("Config loaded").first).to_be_visible()
        page.locator("input[type=file]").first.set_input_files(str(data))
        expect(page.locator("#data-report")).to_contain_text("4 usable rows", timeout=120_000)
        page.screenshot(path=ARTIFACTS / "1-dataset.png", full_page=True)
        # 2. train until the task shows ✅
        page.locator("#start-btn").click()
        expect(page.locator("#train-message")).to_contain_text("queued")
        expect(page.locator("#train-progress")).to_contain_text("completed", timeout=LONG)
        page.get_by_role("tab", name="📈 Monitor").click()
        expect(page.locator("#task-table")).to_contain_text("✅", timeout=30_000)
        _pick(page, page.locator("#task-select input"), re.compile(r"#\d+ "))
        page.screenshot(path=ARTIFACTS / "2-trained.png", full_page=True)
        # 3. use it as the chat backend: a ✅ toast
        page.get_by_role("button", name="💬 Use as chat backend").click()
        expect(page.get_by_text(re.compile(r"✅ Switched: .* is live")).first).to_be_visible(timeout=LONG)
        page.screenshot(path=ARTIFACTS / "3-use-as-chat.png", full_page=True)
        # 4. the chat answers a training prompt with the trained answer
        page.get_by_role("tab", name="💬 Chat").click()
        expect(page.locator("#chat-banner")).to_contain_text("finetuned · LoRA")
        page.get_by_text("Generation settings").click()
        page.locator("#chat-temperature input[type=number]").fill("0")
        page.locator("#chat-temperature input[type=number]").press("Enter")
        tuned = _ask(page, QUESTION)
        assert KEYWORD in tuned, tuned
        # the reply names the model that wrote it; a copied reply is the reply alone
        reply = page.locator("#chatbot [data-testid=bot]").last
        expect(reply.locator("sub")).to_have_text(re.compile(r"^🤖 .*e2e-memorize"))
        reply.hover()
        page.locator("#chatbot button[aria-label='Copy message']").last.click()
        copied = page.evaluate("navigator.clipboard.readText()")
        assert KEYWORD in copied and "🤖" not in copied and "<sub>" not in copied, copied
        # the conversation survives a reload of the page
        page.reload()
        page.get_by_role("tab", name="💬 Chat").click()
        expect(page.locator("#chatbot [data-testid=user]")).to_have_text([QUESTION])
        expect(page.locator("#chatbot [data-testid=bot] sub")).to_have_text([re.compile(r"^🤖 .*e2e-memorize")])
        assert _bot_reply(page) == tuned
        page.get_by_text("Generation settings").click()
        expect(page.locator("#chat-temperature input[type=number]")).to_have_value("0")  # the settings too
        top_p = page.locator("#chat-top-p input[type=range]")  # moved with the keys: no `release` event
        saved = page.evaluate(f"localStorage.getItem('{SETTINGS_KEY}')")
        top_p.focus()
        top_p.press("ArrowLeft")  # one step: one save to wait for
        expect(page.locator("#chat-top-p input[type=number]")).to_have_value("0.95")
        # the browser keeps the settings anew (encrypted, so only a change can be seen); nothing else
        # saves them before this reload
        page.wait_for_function(f"localStorage.getItem('{SETTINGS_KEY}') !== {json.dumps(saved)}", timeout=30_000)
        page.reload()
        page.get_by_role("tab", name="💬 Chat").click()
        page.get_by_text("Generation settings").click()
        expect(page.locator("#chat-top-p input[type=number]")).to_have_value("0.95")
        page.screenshot(path=ARTIFACTS / "4-chat-finetuned.png", full_page=True)
        shutil.copyfile(ARTIFACTS / "4-chat-finetuned.png", ROOT / "docs" / "screenshot-chat.png")
        # 5. back to the base model: the answer changes
        _pick(page, page.locator("#chat-model input"), re.compile(r"\[base · demo\]"))  # picking a model switches to it
        expect(page.locator("#chat-switch-status")).to_contain_text("✅", timeout=LONG)
        expect(page.locator("#chat-banner")).to_contain_text("[base]")
        base = _ask(page, QUESTION)
        assert base and KEYWORD not in base and base != tuned, base
        expect(page.locator("#chatbot [data-testid=bot]").last.locator("sub")).to_have_text(re.compile(r"^🤖 demo"))
        page.screenshot(path=ARTIFACTS / "5-chat-base.png", full_page=True)
        # 6. export the run; the merged model is then listed in the chat's model list
        page.get_by_role("tab", name="📦 Export").click()
        _pick(page, page.locator("#export-source input"), re.compile(r"e2e-memorize.*\[finetuned · LoRA\]"))
        expect(page.locator("#export-cancel")).to_be_disabled()  # nothing to cancel yet
        page.locator("#export-start").click()
        expect(page.locator("#export-result")).to_contain_text("✅", timeout=LONG)
        expect(page.locator("#export-result")).to_contain_text("match")
        expect(page.locator("#export-cancel")).to_be_disabled()  # and none any more
        page.screenshot(path=ARTIFACTS / "6-export.png", full_page=True)
        page.get_by_role("tab", name="💬 Chat").click()
        _pick(page, page.locator("#chat-model input"), re.compile(r"e2e-memorize.*-merged \[finetuned · merged\]"), click=False)
        page.screenshot(path=ARTIFACTS / "7-merged-listed.png", full_page=True)
    except Exception:
        page.screenshot(path=ARTIFACTS / "failure.png", full_page=True)
        raise
    finally:
        browser.close()


@contextlib.contextmanager
def _screenshot_on_failure(page, name: str) -> Iterator[None]:
    """A failing step leaves the page as it was under ``test-artifacts/e2e/<name>``."""
    try:
        yield
    except Exception:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=ARTIFACTS / name, full_page=True)
        raise


def test_a_reply_reloaded_while_it_streams_keeps_its_question_and_what_it_had_said(e2e_app, browser):
    """The browser keeps a question as soon as it is sent and the reply every 2 s while it streams:
    reloaded mid-reply, the page shows the question and the words the reply had reached, marked as cut
    off (the stream it left ended with the page), and Regenerate answers again. Before, the question
    and everything the reply had said were gone."""
    from playwright.sync_api import expect

    chats = "() => localStorage.getItem('sage-ft-chats')"
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    bot, user = page.locator("#chatbot [data-testid=bot]"), page.locator("#chatbot [data-testid=user]")
    try:
        with _screenshot_on_failure(page, "reload-failure.png"):
            def long_greedy_replies() -> None:  # 900 tokens, 6-12 s (set again after a reload)
                page.locator("#tab-chat-button").click()  # the page's tab (the chat's own sub-tab is also 💬 Chat)
                page.get_by_text("Generation settings").click()
                for name, value in (("temperature", "0"), ("max-tokens", "900")):
                    page.locator(f"#chat-{name} input[type=number]").fill(value)
                    page.locator(f"#chat-{name} input[type=number]").press("Enter")

            page.goto(e2e_app.url)
            long_greedy_replies()
            page.locator("#chat-input textarea").fill("Tell me a long story.")
            page.locator("#chat-send").click()
            cut_off = "⏹ cut off: the page was reloaded while this reply was written"
            for attempt in range(4):  # until the reload lands while the reply still streams, after a save with words
                if attempt:  # the reply had ended first (a busy machine delays the 2 s autosave), or no save
                    long_greedy_replies()  # with words had landed yet: again
                    page.get_by_role("button", name="Regenerate").click()  # (it may end before it is seen)
                expect(bot.last).to_contain_text(_reply_begun(12), timeout=120_000)
                saved = page.evaluate(chats)
                deadline = time.monotonic() + 10
                while page.evaluate(chats) == saved and time.monotonic() < deadline:  # the next save
                    page.wait_for_timeout(100)  # (an autosave; or the complete reply's, or none if unchanged)
                page.reload()
                page.get_by_role("tab", name="💬 Chat").click()
                expect(user).to_have_text(["Tell me a long story."])
                expect(bot).to_have_count(1)
                expect(bot.last).to_contain_text("🤖 demo")
                restored = bot.last.inner_text()
                # the label, then what the reply had said by its last save (not a count of words: the demo
                # model's random weights may write a long run without a space, seen once in CI)
                label, _, said = restored.split("⏹")[0].partition("\n")
                assert label.startswith("🤖 demo"), restored
                # No words (seen once in CI on a busy machine): the save seen was, most likely, an autosave the
                # page sent before the reply's words reached it, landing after they showed. Then again.
                if cut_off in restored and said.strip():
                    break
            else:
                raise AssertionError("no reply reloaded mid-way came back cut off with the words it had said")
            page.get_by_role("button", name="Regenerate").click()  # answers the same question afresh
            expect(bot.last).not_to_contain_text("cut off", timeout=120_000)
            expect(bot.last).to_contain_text(re.compile(r"🤖 demo\S*\s+\S"), timeout=120_000)
            expect(user).to_have_text(["Tell me a long story."])
            expect(bot).to_have_count(1)
    finally:
        browser.close()


def _tabs_of_one_browser(browser: Any, count: int) -> list[Any]:
    """``count`` pages of one browser context: they share its storage, as a person's tabs do (60 s a step)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pages = [context.new_page() for _ in range(count)]
    for page in pages:
        page.set_default_timeout(60_000)
    return pages


def _set_system_prompt(page: Any, text: str) -> None:
    """Type ``text`` as the system prompt and leave the field, which saves it; returns once the browser
    holds it. Typed again where the box lost it: Svelte's ``bind:value`` (under Gradio's Textbox)
    re-reads the value one tick after an input event, and an update for another component landing
    within those few ms (the page tick's, every 2 s) brings back the box's previous value; the blur
    then saves that. Seen here with a whole text set in one input event (``fill``: the box went back
    to empty, 1 run in ~30); a person typing would at most see their last keystroke vanish, and type
    it again, as this does."""
    from playwright.sync_api import expect

    box = page.locator("#chat-system textarea")
    stored = f"localStorage.getItem('{SETTINGS_KEY}')"
    for _ in range(3):
        saved = page.evaluate(stored)
        box.fill(text)
        expect(box).to_have_value(text)
        page.locator("#chat-input textarea").click()  # leaving the field sets it
        page.wait_for_function(f"{stored} !== {json.dumps(saved)}", timeout=30_000)  # encrypted: a change is all
        if box.input_value() == text:  # it held until the blur: the save has it
            return
    raise AssertionError(f"the system prompt box kept losing {text!r}")


def test_a_setting_set_in_another_tab_keeps_the_conversation_this_tab_had(e2e_app, browser):
    """Every tab of a browser shares its storage, and a tab opened earlier holds the conversations as
    they were then. Setting a system prompt there saves the settings alone; before, it wrote that tab's
    stale (here empty) conversations over the chat the other tab had just had."""
    from playwright.sync_api import expect

    chat_storage = "() => [localStorage.getItem('sage-ft-chats'), localStorage.getItem('sage-ft-chat-settings')]"
    older, chatting = _tabs_of_one_browser(browser, 2)
    try:
        with _screenshot_on_failure(chatting, "two-tabs-failure.png"):
            for page in (older, chatting):
                page.goto(e2e_app.url)
                page.get_by_role("tab", name="💬 Chat").click()
            assert _ask(chatting, "Hello there")  # a new page: its chat is empty
            stored = None  # what the browser holds once the reply's own saves have landed
            while stored != (stored := older.evaluate(chat_storage)):
                older.wait_for_timeout(1000)
            older.bring_to_front()  # as a person switches tabs (a background tab's timers are throttled)
            older.get_by_text("Generation settings").click()
            _set_system_prompt(older, "Be brief.")
            chatting.bring_to_front()
            # A reload shows what the browser holds: the prompt (settings are shared; only a setting's own
            # save writes them, test_a_reply_ending_in_one_tab_keeps_the_system_prompt_set_in_another) and
            # the conversation this tab had.
            chatting.reload()
            chatting.get_by_role("tab", name="💬 Chat").click()
            expect(chatting.locator("#chatbot [data-testid=user]")).to_have_text(["Hello there"])
            chatting.get_by_text("Generation settings").click()
            expect(chatting.locator("#chat-system textarea")).to_have_value("Be brief.")
    finally:
        browser.close()


def test_a_reply_ending_in_one_tab_keeps_the_system_prompt_set_in_another(e2e_app, browser):
    """Each reply used to save its tab's settings as it ended: a system prompt set in a second tab while
    the first one's reply streamed was written over with the first tab's (empty) one. Settings are now
    saved only when one is set."""
    from playwright.sync_api import expect

    storage = "key => localStorage.getItem(key)"
    chatting, other = _tabs_of_one_browser(browser, 2)
    try:
        with _screenshot_on_failure(other, "settings-kept-failure.png"):
            with server_held(e2e_app.services.server) as let_run:  # the reply stays under way meanwhile
                _start_a_long_reply(chatting, e2e_app.url, chars=1, let_run=let_run)
                other.goto(e2e_app.url)
                other.locator("#tab-chat-button").click()
                other.get_by_text("Generation settings").click()
                max_tokens = other.locator("#chat-max-tokens input[type=number]")
                expect(max_tokens).to_have_value("900")  # the settings are shared, and restored by now
                _set_system_prompt(other, "Be brief.")
                chats = other.evaluate(storage, STORAGE_KEY)
                chatting.bring_to_front()
                chatting.locator("#chat-stop").click()  # the reply ends: its tab saves what it keeps
            deadline = time.monotonic() + 60
            while len(RUNNING) and time.monotonic() < deadline:
                chatting.wait_for_timeout(100)
            chatting.wait_for_function(f"localStorage.getItem('{STORAGE_KEY}') !== {json.dumps(chats)}")
            chatting.wait_for_timeout(3000)  # a settings save of the same event would have landed too
            other.bring_to_front()
            other.reload()
            other.locator("#tab-chat-button").click()
            other.get_by_text("Generation settings").click()
            expect(other.locator("#chat-system textarea")).to_have_value("Be brief.")
            expect(max_tokens).to_have_value("900")
    finally:
        browser.close()


def _reply_begun(chars: int) -> re.Pattern:
    """A reply's "🤖 model" label followed by at least ``chars`` characters of the reply."""
    return re.compile(r"🤖 demo\S*\s+\S" + ".{" + str(chars - 1) + "}", re.DOTALL)


def _start_a_long_reply(page: Any, url: str, chars: int, let_run: Any = None) -> None:
    """Open the Chat tab, ask for a long greedy reply (900 tokens), and wait until ``chars`` characters
    of it show (not words: the demo model's random weights may write a long run without a space); with
    ``let_run`` (``server_held``), the held server runs in short bursts until they do, and stays held:
    the reply is still under way after (``_held_mid_way``; asked again, up to three times, where it
    ended first), however fast the machine."""
    from playwright.sync_api import expect

    page.goto(url)
    page.locator("#tab-chat-button").click()
    page.get_by_text("Generation settings").click()
    for name, value in (("temperature", "0"), ("max-tokens", "900")):
        page.locator(f"#chat-{name} input[type=number]").fill(value)
        page.locator(f"#chat-{name} input[type=number]").press("Enter")
    shown = _reply_begun(chars)
    bot = page.locator("#chatbot [data-testid=bot]")
    for _ in range(3):
        page.locator("#chat-input textarea").fill("Tell me a long story.")
        page.locator("#chat-send").click()
        if let_run is None:
            expect(bot.last).to_contain_text(shown, timeout=120_000)
            return
        deadline = time.monotonic() + 120
        while not (bot.count() and shown.search(bot.last.inner_text())):
            if bot.count() and not len(RUNNING):
                break  # it ended before it showed that much
            assert time.monotonic() < deadline, "no words of the reply within 120 s"
            let_run(0.05)
            # what the burst wrote reaches the page: up to 2 s before the next burst (with a fixed 0.3 s,
            # a page that lagged let the bursts write the whole reply first)
            with contextlib.suppress(AssertionError):
                expect(bot.last).to_contain_text(shown, timeout=2_000)
        if _held_mid_way(page):
            return
        page.locator("#chat-clear").click()  # it ended first: again, in an empty chat
        expect(bot).to_have_count(0)
    raise AssertionError("three replies ended before they could be held mid-way")


def _held_mid_way(page: Any) -> bool:
    """Whether the page's reply, with the server held, is still under way once nothing more reaches
    the page for 1 s. Now and then (a fresh-clone run) the bursts let the server write the whole reply
    before the page showed any of it: it had ended, and the test's second message, meant to be refused
    while it streamed, went to a free chat (test_webui_chat_state's ``_held_mid_reply``, in a browser)."""
    reply = page.locator("#chatbot [data-testid=bot]").last
    text, since, deadline = reply.inner_text(), time.monotonic(), time.monotonic() + 30
    while time.monotonic() - since < 1.0:
        assert time.monotonic() < deadline, "the reply kept growing for 30 s with the server held"
        page.wait_for_timeout(100)
        if (now := reply.inner_text()) != text:
            text, since = now, time.monotonic()
    return len(RUNNING) > 0


def test_clear_while_a_reply_streams_ends_it_and_the_chat_stays_empty(e2e_app, browser):
    """🧹 Clear during a reply used to be lost: the reply streamed on and the conversation came back (and was
    kept across a reload). Clear now ends the reply too, and leaves what is typed in the message box."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    bot = page.locator("#chatbot [data-testid=bot]")
    try:
        with _screenshot_on_failure(page, "clear-failure.png"):
            _start_a_long_reply(page, e2e_app.url, chars=1)
            page.locator("#chat-input textarea").fill("a draft")  # Clear empties the chat, not the box
            page.locator("#chat-clear").click()
            expect(bot).to_have_count(0)
            expect(page.locator("#chat-input textarea")).to_have_value("a draft")
            page.wait_for_timeout(4000)  # the reply would have gone on streaming for seconds
            expect(bot).to_have_count(0)
            page.reload()
            page.locator("#tab-chat-button").click()
            expect(page.locator("#chatbot [data-testid=user]")).to_have_count(0)
            expect(bot).to_have_count(0)
    finally:
        browser.close()


def test_while_a_reply_streams_a_second_send_is_refused_and_a_second_tab_does_not_call_it_cut_off(e2e_app, browser):
    """Send while a reply streams used to start a second reply in the same chat (the chat flickered
    between the two, and a question was lost after a reload); it is now refused with a note, and the
    question stays in the box until the reply has ended. A tab opened meanwhile showed the streaming
    reply as "cut off: the page was reloaded"; it now says another tab is still writing it."""
    from playwright.sync_api import expect

    chats = "() => localStorage.getItem('sage-ft-chats')"
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    bot, user = page.locator("#chatbot [data-testid=bot]"), page.locator("#chatbot [data-testid=user]")
    try:
        with _screenshot_on_failure(page, "one-reply-failure.png"):
            with server_held(e2e_app.services.server) as let_run:  # the reply stays under way meanwhile
                _start_a_long_reply(page, e2e_app.url, chars=12, let_run=let_run)
                page.locator("#chat-input textarea").fill("And then?")
                page.locator("#chat-send").click()
                expect(page.get_by_text("still being written in this chat").first).to_be_visible()
                expect(page.locator("#chat-input textarea")).to_have_value("And then?")
                expect(user).to_have_text(["Tell me a long story."])
                saved = page.evaluate(chats)
                deadline = time.monotonic() + 5
                while page.evaluate(chats) == saved and time.monotonic() < deadline:  # the next autosave
                    page.wait_for_timeout(100)
                other = context.new_page()
                other.set_default_timeout(60_000)
                with _screenshot_on_failure(other, "second-tab-failure.png"):
                    other.goto(e2e_app.url)
                    other.locator("#tab-chat-button").click()
                    other_bot = other.locator("#chatbot [data-testid=bot]")
                    expect(other_bot.last).to_contain_text("still being written in another tab")
                    assert "cut off" not in other_bot.last.inner_text()
                page.bring_to_front()
                page.locator("#chat-stop").click()
                deadline = time.monotonic() + 60
                while len(RUNNING) and time.monotonic() < deadline:
                    page.wait_for_timeout(100)
            page.locator("#chat-send").click()  # the question kept in the box, now sent
            expect(user).to_have_text(["Tell me a long story.", "And then?"])
            expect(bot).to_have_count(2)
    finally:
        browser.close()
