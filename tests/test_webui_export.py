"""Export tab handlers through the real HTTP API (gradio_client): merge + verify + GGUF + zip of a really
trained run, the result listed as [merged] and served (in-process transformers backend), cancel, and
the refusals (target exists, bad target name, no source, unsupported GGUF architecture)."""

from __future__ import annotations

import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import pytest

from sage_ft import paths
from sage_ft.export import merge_lora
from sage_ft.models.registry import list_models
from sage_ft.webui import export_tab
from tests.fixtures_training import MEMORIZE_QA
from tests.fixtures_webui import start_webui

pytestmark = pytest.mark.slow  # trains the session's trained_run when run alone

OPTIONS = ("auto", "2GB")  # dtype, shard size


@pytest.fixture(scope="module")
def export_app(tmp_path_factory, demo_model):
    from sage_ft.serving import ServerManager

    manager = ServerManager("demo", backend="transformers", adopt=False)
    app = start_webui(tmp_path_factory.mktemp("webui_export"), start_worker=False, server=manager)
    yield app
    app.close()
    manager.close()


@pytest.fixture(scope="module")
def client(export_app):
    return export_app.client()


@pytest.fixture(scope="module")
def run_in_home(trained_run) -> Path:
    """The session's trained run, copied under the data home's runs/ (where finished runs live)."""
    target = paths.runs_dir() / "memorize-export"
    if not target.exists():
        shutil.copytree(trained_run, target)
    return target


def _export(client, source, target="", overwrite=False, verify=True, gguf="none", make_zip=False):
    return client.predict(str(source), *OPTIONS, target, overwrite, verify, gguf, make_zip, "en",
                          api_name="/export_start")


def test_with_no_finished_run_the_empty_list_is_explained(client, tmp_path, monkeypatch):
    """An empty source list said only 'No export running.' (an empty picker with no explanation is
    what LLaMA-Factory users report, #9060): with no finished run in the data home it says how one
    gets there. The app runs in this process, so a fresh data home is one variable away."""
    monkeypatch.setenv("SAGE_FT_HOME", str(tmp_path / "empty-home"))
    update, progress, result, _ = client.predict("en", None, api_name="/export_sources")
    assert update["choices"] == [] and update["value"] is None
    assert "No fine-tune to export yet" in progress and "Train tab" in progress, progress
    assert "还没有可导出的微调" in client.predict("zh", None, api_name="/export_sources")[1]
    typed = str(tmp_path / "some-run")  # a typed folder: the user is past the hint
    assert "No export running" in client.predict("en", typed, api_name="/export_sources")[1]


def test_sources_list_runs_and_their_checkpoints(client, run_in_home):
    update, progress, result, _ = client.predict("en", None, api_name="/export_sources")
    values = [value for _, value in update["choices"]]
    assert str(run_in_home / "lora") in values and str(run_in_home / "checkpoint-30") in values
    assert all("[base" not in label for label, _ in update["choices"])
    assert update["value"] == values[0]  # the newest run, picked for the user; a pick is kept:
    assert client.predict("en", values[1], api_name="/export_sources")[0]["value"] == values[1]
    assert "No export running" in progress and result == ""


def test_export_merges_verifies_writes_gguf_and_zip_and_is_listed_and_servable(client, run_in_home):
    progress, result, download = _export(client, run_in_home / "lora", "ui-merged", gguf="q8_0", make_zip=True)
    out = paths.exports_dir() / "ui-merged"
    assert 'data-state="completed"' in progress and "100%" in progress
    assert result.startswith("✅") and str(out) in result, result
    assert "Merged model vs base + adapter: match" in result and "GGUF vs merged model: match" in result
    # the whole export is timed (it said the merge's 3.7 s for a 25 s job), and each part of it
    timing = re.search(r"Exported in ([\d.]+) s \(merge ([\d.]+) s · GGUF ([\d.]+) s · zip ([\d.]+) s\)", result)
    assert timing, result
    total, *parts = (float(x) for x in timing.groups())
    assert total >= sum(parts) - 0.15 and min(parts) >= 0
    assert (out / "config.json").is_file() and (out / "gguf" / "ui-merged-q8_0.gguf").is_file()
    assert json.loads((out / "sage_ft_export.json").read_text())["verify"]["ok"] is True
    with zipfile.ZipFile(download["value"]) as archive:
        names = archive.namelist()
    assert "ui-merged/config.json" in names and "ui-merged/gguf/ui-merged-q8_0.gguf" in names

    entry = next(e for e in list_models() if e.path == str(out))
    assert entry.kind == "merged" and entry.label == "ui-merged [finetuned · merged]"
    labels = [label for label, _ in client.predict("en", None, None, api_name="/chat_models")[0]["choices"]]
    assert "ui-merged [finetuned · merged]" in labels

    status, _, banner, *_ = client.predict(str(out), "en", api_name="/chat_switch")
    assert status.startswith("✅") and "[merged]" in banner
    # a merged model is its own base: the banner says what it was merged from (it showed Base = its own path)
    assert "Merged from: <code>demo</code>" in banner and "Base:" not in banner
    question, answer = MEMORIZE_QA[0]
    history, _ = client.predict(question, [], "", 0.0, 1.0, 16, "en", api_name="/chat_send")
    assert answer.split()[-1].rstrip(".") in history[-1]["content"][0]["text"]  # "pineapple"
    # Compare takes the served merged model as the base it is (it said "… (it serves None)")
    side_a, _, compare_status, _ = client.predict(question, [], [], str(out), str(out), "", 0.0, 1.0, 16, "en",
                                                  api_name="/chat_compare")
    assert "None" not in compare_status and answer.split()[-1].rstrip(".") in str(side_a[-1]["content"]), compare_status


def test_refusals_are_clear_and_leave_nothing_behind(client, run_in_home, tmp_path):
    before = sorted(p.name for p in paths.exports_dir().iterdir())
    _, result, _ = _export(client, "", "x")
    assert result.startswith("❌") and "Pick a fine-tuned run" in result
    _, result, _ = _export(client, run_in_home / "lora", "../outside")
    assert result.startswith("❌") and "'../outside' is not allowed" in result
    _, result, _ = _export(client, run_in_home / "lora", "a" * 300)  # refused for its length, not its letters
    assert result.startswith("❌") and "300 characters long; use at most 100" in result and "aaa" not in result
    _, result, _ = _export(client, tmp_path / "nothing-here")
    assert result.startswith("❌") and "does not exist" in result
    (paths.exports_dir() / "taken").mkdir()
    (paths.exports_dir() / "taken" / "notes.txt").write_text("mine")
    progress, result, _ = _export(client, run_in_home / "lora", "taken")
    assert result.startswith("❌") and "already exists" in result
    # the bar says it was refused (it read "checking · 0%", as if the export were still starting)
    assert 'data-state="refused"' in progress and "refused" in progress and "checking" not in progress
    _, result, _ = _export(client, run_in_home / "lora", "taken", overwrite=True)
    assert result.startswith("❌") and "not a sage-ft export" in result
    assert (paths.exports_dir() / "taken" / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in paths.exports_dir().iterdir()) == sorted([*before, "taken"])


def test_gguf_of_an_unsupported_architecture_is_refused_before_merging(client, run_in_home, demo_model, tmp_path):
    base = tmp_path / "mistral-shaped"
    shutil.copytree(demo_model, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    run = tmp_path / "odd-run"
    shutil.copytree(run_in_home / "lora", run / "lora")
    meta = json.loads((run_in_home / "finetune_meta.json").read_text())
    (run / "finetune_meta.json").write_text(json.dumps({**meta, "base_model_path": str(base)}))
    progress, result, _ = _export(client, run, "odd-gguf", gguf="f16")
    assert result.startswith("❌") and "does not support architecture MistralForCausalLM" in result
    assert 'data-state="refused"' in progress and not (paths.exports_dir() / "odd-gguf").exists()


def test_cancel_stops_the_export_and_leaves_nothing(client, run_in_home):
    for _ in range(3):  # the demo's export takes seconds: now and then it ended before the cancel landed (CI)
        job = client.submit(str(run_in_home / "checkpoint-30"), *OPTIONS, "cancelled-one", False, True, "none", False,
                            "en", api_name="/export_start")
        while not job.done() and not any('data-state="running"' in str(o[0]) for o in job.outputs()):
            time.sleep(0.02)
        said = client.predict("en", api_name="/export_cancel")
        if "Cancel requested" in said:
            break
        progress, result, _ = job.result(timeout=120)  # it had ended, complete: removed, and again
        assert "No export is running" in said and result.startswith("✅"), (said, result)
        shutil.rmtree(paths.exports_dir() / "cancelled-one")
    else:
        raise AssertionError("three exports ended before their cancel landed")
    progress, result, _ = job.result(timeout=120)
    assert 'data-state="cancelled"' in progress and result.startswith("⏹ Export cancelled")
    assert not any(p.name.startswith(("cancelled-one", ".cancelled-one")) for p in paths.exports_dir().iterdir())
    assert "No export is running" in client.predict("en", api_name="/export_cancel")


def test_overwriting_the_export_this_app_chats_with_is_refused(client, run_in_home):
    """The chat serves an export: overwriting it would change the banner and the record, not the weights."""
    out = paths.exports_dir() / "served-here"
    merge_lora(run_in_home / "checkpoint-30", out_dir=out, verify=False)
    status, _, banner, *_ = client.predict(str(out), "en", api_name="/chat_switch")
    assert status.startswith("✅") and "served-here" in banner
    progress, result, _ = _export(client, run_in_home / "lora", "served-here", overwrite=True, verify=False)
    assert result.startswith("❌") and f"refusing to overwrite {out}: it is being served" in result, result
    assert "the chat of this sage-ft process (in-process transformers backend)" in result
    assert "Switch the chat to another model first" in result and "export under another name" in result
    assert 'data-state="refused"' in progress
    record = json.loads((out / "sage_ft_export.json").read_text())
    assert record["checkpoint"] == "checkpoint-30"
    # switched away, the same export overwrites it
    assert client.predict("demo", "en", api_name="/chat_switch")[0].startswith("✅")
    progress, result, _ = _export(client, run_in_home / "lora", "served-here", overwrite=True, verify=False)
    assert result.startswith("✅") and 'data-state="completed"' in progress, result
    assert json.loads((out / "sage_ft_export.json").read_text())["checkpoint"] is None


def test_cancel_is_on_only_while_the_export_runs(export_app, run_in_home):
    """⏹ Cancel was on with no export running and answered "No export is running" after the click."""
    def interactive(outputs) -> bool:
        return outputs[3]["interactive"]

    assert interactive(export_tab.snapshot(export_app.services, "en")) is False  # before, or after the last one
    shown = list(export_tab.run_export(export_app.services, str(run_in_home / "checkpoint-30"), *OPTIONS,
                                       "cancel-button", False, False, "none", False, "en"))
    assert interactive(shown[0]) is True and 'data-state="running"' in shown[0][0]
    assert interactive(shown[-1]) is False and shown[-1][1].startswith("✅"), shown[-1]
    assert interactive(export_tab.snapshot(export_app.services, "en")) is False
    refused = list(export_tab.run_export(export_app.services, "", *OPTIONS, "", False, False, "none", False, "en"))
    assert [interactive(o) for o in refused] == [False]


class _CancelAt(export_tab.ExportJob):
    """An export whose user presses Cancel the moment the bar first shows a stage starting with ``at``."""

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "stage" and str(value).startswith(getattr(self, "at", "\0")):
            self.cancel.set()


@pytest.mark.parametrize("at", ["gguf: verifying", "zip"])
def test_cancel_during_gguf_or_zip_stops_and_keeps_only_the_complete_merge(export_app, run_in_home, at):
    """Cancel was ignored after the merge: the GGUF and the zip were written anyway."""
    name = f"cancel-at-{at.split(':')[0]}"
    out = paths.exports_dir() / name
    job = _CancelAt(str(run_in_home / "lora"))
    job.at = at
    export_tab._work(export_app.services, job, out, "auto", "2GB", False, True, "q8_0", True)
    assert job.cancelled and job.error is None
    result, progress = export_tab.result_markdown(job, "en"), export_tab.progress_html(job, "en")
    assert 'data-state="cancelled"' in progress and "cancelled at" in progress
    assert result.startswith(f"⏹ Export cancelled at {at}"), result
    assert f"The merged model `{out}` was already complete and verified, so it was kept" in result
    assert (out / "config.json").is_file() and json.loads((out / "sage_ft_export.json").read_text())["verify"]["ok"]
    assert not [p for p in export_app.services.downloads_dir.iterdir() if name in p.name]
    assert not list(out.parent.glob(".*"))
    gguf_file = out / "gguf" / f"{name}-q8_0.gguf"
    if at == "zip":  # the GGUF was complete and verified before the cancel: kept, and said so
        assert gguf_file.is_file() and f"The GGUF file `{gguf_file}` was already complete" in result
    else:
        assert "no GGUF file was written" in result and not (out / "gguf").exists()
        assert json.loads((out / "sage_ft_export.json").read_text())["gguf"] == []


def test_cancel_while_the_gguf_is_verified_shows_the_stop(client, export_app, run_in_home, monkeypatch):
    """Through the page's own handlers: Cancel at "gguf: verifying" ends with ⏹, not a GGUF and a zip.
    The page's Cancel is pressed from the export's own thread as it enters that stage, so the export
    goes on only once Cancel has answered (watching the page for the stage, the demo's GGUF was
    verified and done before Cancel came, now and then)."""
    answers: list[str] = []

    class CancelledAtVerifying(export_tab.ExportJob):
        def __setattr__(self, name: str, value: object) -> None:
            super().__setattr__(name, value)
            if name == "stage" and str(value).startswith("gguf: verifying") and not answers:
                answers.append(client.predict("en", api_name="/export_cancel"))

    monkeypatch.setattr(export_tab, "ExportJob", CancelledAtVerifying)
    job = client.submit(str(run_in_home / "lora"), *OPTIONS, "cancel-in-gguf", False, True, "q8_0", True, "en",
                        api_name="/export_start")
    progress, result, _ = job.result(timeout=300)
    assert len(answers) == 1 and "Cancel requested" in answers[0], answers
    out = paths.exports_dir() / "cancel-in-gguf"
    assert 'data-state="cancelled"' in progress and result.startswith("⏹ Export cancelled at gguf: "), result
    assert "was already complete and verified, so it was kept" in result
    assert not (out / "gguf").exists() and not list(export_app.services.downloads_dir.glob("cancel-in-gguf*"))
