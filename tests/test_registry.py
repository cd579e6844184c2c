"""The model registry on a fresh data home: base models, fine-tunes from a real run, bad directories."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sage_ft import paths
from sage_ft.models import registry
from sage_ft.models.resolve import ModelError


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty data home of its own (the session home may already hold a built demo model)."""
    monkeypatch.setenv("SAGE_FT_HOME", str(tmp_path / "home"))
    return paths.home()


def _copy_run(src: Path, name: str, **meta_changes) -> Path:
    dst = paths.runs_dir() / name
    shutil.copytree(src, dst)
    meta = json.loads((dst / "finetune_meta.json").read_text())
    meta.update(meta_changes)
    (dst / "finetune_meta.json").write_text(json.dumps(meta))
    return dst


def test_demo_listed_without_building_it(home):
    entries = registry.list_models()
    demo = entries[0]
    assert demo.name == "demo" and demo.tags == ["base", "demo"] and demo.kind == "base"
    assert demo.note == "not built yet, built on first use"
    assert not paths.demo_model_dir().exists()  # listing never builds
    assert demo.label == "demo [base · demo]"


def test_configured_models_shipped_and_user(home):
    (home / "models.yaml").write_text("models:\n  - name: my-hub-model\n    path: someorg/some-model\n")
    by_name = {e.name: e for e in registry.list_models()}
    assert by_name["Qwen2.5-0.5B-Instruct"].source == "config"
    assert not by_name["Qwen2.5-0.5B-Instruct"].available
    assert "first use" in by_name["Qwen2.5-0.5B-Instruct"].note
    assert by_name["my-hub-model"].path == "someorg/some-model" and by_name["my-hub-model"].tags == ["base"]


def test_broken_user_yaml_is_ignored(home):
    (home / "models.yaml").write_text("models: [unclosed\n")
    assert registry.list_models()[0].name == "demo"


def test_add_local_model_and_find_it(home, demo_model, tmp_path):
    local = shutil.copytree(demo_model, tmp_path / "my-llama")
    entry = registry.add_local_model(local, name="My Llama")
    assert entry.tags == ["base"] and entry.source == "local" and entry.size_bytes > 0
    found = registry.find_model("My Llama")
    assert found is not None and found.path == str(local.resolve())
    assert registry.find_model(str(local)).name == "My Llama"
    assert registry.find_model("no-such-model") is None
    # adding twice keeps one entry (renamed)
    registry.add_local_model(local, name="Renamed")
    names = [e.name for e in registry.list_models()]
    assert "Renamed" in names and "My Llama" not in names


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "tokenizer.json").unlink() or (d / "tokenizer_config.json").unlink(), "tokenizer"),
    (lambda d: (d / "model.safetensors").unlink(), "missing weights"),
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json is not a valid JSON object"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})),
     "model-00001-of-00002.safetensors"),
    (lambda d: (d / "model.safetensors.index.json").write_text("{not json"), "corrupted"),
])
def test_add_refuses_broken_directory_with_path_and_reason(home, demo_model, tmp_path, damage, expected):
    broken = shutil.copytree(demo_model, tmp_path / "broken")
    damage(broken)
    with pytest.raises(ModelError) as err:
        registry.add_local_model(broken)
    assert str(broken.resolve()) in str(err.value) and expected in str(err.value)
    assert not (home / "models.yaml").exists()


def test_missing_directory_is_refused(home, tmp_path):
    """Each reason reads as a sentence (they read "missing the directory does not exist" before)."""
    with pytest.raises(ModelError, match="cannot be used: the directory does not exist$"):
        registry.add_local_model(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ModelError, match="cannot be used: it is a file, not a directory$"):
        registry.add_local_model(tmp_path / "a-file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="cannot be used: missing config.json"):
        registry.add_local_model(tmp_path / "empty")


def test_configured_dir_that_vanished_is_shown_unavailable(home, demo_model, tmp_path):
    local = shutil.copytree(demo_model, tmp_path / "soon-gone")
    registry.add_local_model(local, name="soon-gone")
    shutil.rmtree(local)
    entry = registry.find_model("soon-gone")
    assert entry is not None and not entry.available and "does not exist" in entry.note


def test_finetunes_from_real_runs(home, trained_run):
    done = _copy_run(trained_run, "run-a", status="completed", finished_at="2030-01-01T10:00:00+00:00")
    _copy_run(trained_run, "run-failed", status="failed")
    _copy_run(trained_run, "run-running", status="running")
    cancelled = _copy_run(trained_run, "run-b", status="cancelled", finished_at="2030-01-02T10:00:00+00:00",
                          task_id="task-42", run_name="")
    shutil.copytree(trained_run / "lora", cancelled / "merged_model_src")  # noise: not a model
    loras = registry.list_models(include_checkpoints=True, kind="lora")
    by_dir = {Path(e.path).parent.name: e for e in loras}
    assert set(by_dir) == {"run-a", "run-b"}  # failed/running runs are not offered
    a = by_dir["run-a"]
    assert a.tags == ["finetuned", "lora"] and a.label.endswith("[finetuned · LoRA]")
    assert a.base_model == "demo" and a.final_loss is not None and a.final_loss > 0
    assert "memorize" in a.dataset and a.size_bytes > 0
    assert [step for step, _ in a.checkpoints] == [30, 60]
    assert by_dir["run-b"].task_id == "task-42"
    assert registry.latest_finetuned().path == str(cancelled / "lora")  # newest first
    assert registry.find_model("task-42").path == str(cancelled / "lora")
    assert registry.list_models(kind="lora")[0].checkpoints == []  # only on request
    assert str(done) in registry.find_model(str(done / "lora")).path


def test_merged_models_from_runs_and_exports(home, trained_run, demo_model):
    run = _copy_run(trained_run, "run-m", status="completed")
    shutil.copytree(demo_model, run / "merged_model")
    export = shutil.copytree(demo_model, paths.exports_dir() / "my-export")
    (export / "sage_ft_export.json").write_text(json.dumps({"base_model": "demo", "final_metrics": {"loss": 0.5}}))
    shutil.copytree(demo_model, paths.exports_dir() / "half-written")
    (paths.exports_dir() / "half-written" / "model.safetensors").unlink()
    merged = {e.name: e for e in registry.list_models(kind="merged")}
    assert set(merged) == {"memorize (run-m)-merged", "my-export"}
    assert merged["my-export"].tags == ["finetuned", "merged"] and merged["my-export"].final_loss == 0.5
    assert merged["memorize (run-m)-merged"].base_model == "demo"
    assert registry.latest_finetuned(kind="merged") is not None


def test_hf_cache_models_are_listed(home, demo_model, tmp_path, monkeypatch):
    cache = tmp_path / "hf"
    repo = cache / "models--tiny--llama"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(demo_model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    entry = registry.find_model("tiny/llama")
    assert entry is not None and entry.source == "hf_cache" and entry.tags == ["base"] and entry.size_bytes > 0
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "missing-cache"))
    assert registry.find_model("tiny/llama") is None  # a missing cache is just empty


def test_listing_imports_no_torch_and_builds_nothing(tmp_path):
    code = ("import sys, json; from sage_ft.models.registry import list_models; "
            "e = list_models(); print(json.dumps(['torch' in sys.modules, len(e)]))")
    env = {**os.environ, "SAGE_FT_HOME": str(tmp_path / "h")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    torch_loaded, count = json.loads(out.stdout)
    assert not torch_loaded and count >= 1
    assert not (tmp_path / "h" / "models" / "demo-tiny-llama").exists()


def test_cli_models_list_and_add(home, demo_model, tmp_path, capsys):
    from sage_ft.cli import main

    assert main(["models", "list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["name"] == "demo" and data[0]["label"] == "demo [base · demo]"
    bad = tmp_path / "empty-dir"
    bad.mkdir()
    assert main(["models", "add", str(bad)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "config.json" in err and "Traceback" not in err
    good = shutil.copytree(demo_model, tmp_path / "good")
    assert main(["models", "add", str(good), "--name", "good-one"]) == 0
    assert main(["models", "list", "--kind", "base"]) == 0
    assert "good-one [base]" in capsys.readouterr().out


def test_cli_models_list_prints_datasets_readably(home, demo_model, capsys):
    """An export's dataset is what its run recorded (a list of files; an object in older runs): it was
    printed as a Python repr, ``data ['/data/qa.jsonl']``."""
    from sage_ft.cli import main

    for name, dataset in (("exp-list", ["/data/qa.jsonl", "/data/more.csv"]),
                          ("exp-object", {"path": "memorise.jsonl", "rows": 12})):
        export = shutil.copytree(demo_model, paths.exports_dir() / name)
        (export / "sage_ft_export.json").write_text(json.dumps({"kind": "merged", "base_model": "demo",
                                                                "dataset": dataset}))
    assert main(["models", "list", "--kind", "merged"]) == 0
    out = capsys.readouterr().out
    assert "data /data/qa.jsonl, /data/more.csv" in out and "data memorise.jsonl (rows 12)" in out
    assert "['" not in out and "{'" not in out
