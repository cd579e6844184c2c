"""Merge export: real peft merges of a LoRA on the demo model, written, reloaded and compared."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from sage_ft import paths
from sage_ft.cli import main as cli_main
from sage_ft.export import ExportCancelled, ExportError, merge_lora, verify_merge, zip_export
from sage_ft.export.merge import parse_size
from sage_ft.models.demo import ensure_demo_model

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    """A run directory as the trainer writes it: lora/ (adapter + tokenizer), a checkpoint, meta.

    lora_B is random (not peft's zeros), so the adapter really changes the model's outputs.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = ensure_demo_model()
    run = tmp_path_factory.mktemp("runs") / "demo-run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(run / "lora")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "lora")
    model.save_pretrained(run / "checkpoint-2")  # adapter only, like a Trainer checkpoint
    (run / "finetune_meta.json").write_text(json.dumps({
        "base_model": str(base), "status": "completed",
        "dataset": {"path": "memorise.jsonl", "rows": 12},
        "config": {"lora_rank": 8, "learning_rate": 0.0002, "num_train_epochs": 3},
        "final_metrics": {"train_loss": 0.4321, "eval_loss": 0.5}}))
    return run


def _logits(model_dir: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return model(**tok(PROMPT, return_tensors="pt")).logits[0].float()


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")] if parent.exists() else []


def test_merge_changes_outputs_and_matches_base_plus_adapter(lora_run, tmp_path):
    stages = []
    out = tmp_path / "merged"
    result = merge_lora(lora_run, out_dir=out, progress=lambda stage, f: stages.append((stage, f)))

    assert result.out_dir == out and result.dtype == "float32"
    assert result.verify is not None and result.verify.ok, result.verify
    assert result.verify.max_abs_diff < 1e-3
    assert [s for s, _ in stages][0] == "checking" and stages[-1] == ("done", 1.0)
    assert [f for _, f in stages] == sorted(f for _, f in stages)

    merged, base = _logits(out), _logits(ensure_demo_model())
    assert (merged - base).abs().max() > 1e-2, "merging the adapter must change the model's outputs"
    again = verify_merge(lora_run, out)  # independent reload of base + adapter
    assert again.ok and again.max_abs_diff < 1e-3 and again.details["top1_agreement"] == 1.0

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
            "sage_ft_export.json"} <= names
    assert "chat_template.jinja" in names or "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and config["architectures"] == ["LlamaForCausalLM"]
    record = json.loads((out / "sage_ft_export.json").read_text())
    assert record["kind"] == "merged" and record["base_model"] == str(ensure_demo_model())
    assert record["source_run"] == str(lora_run) and record["verify"]["ok"] is True
    card = (out / "README.md").read_text()
    for fact in (str(ensure_demo_model()), "memorise.jsonl", "lora_rank: 8", "train_loss", "0.4321", "passed"):
        assert fact in card
    assert _leftovers(tmp_path) == []


def test_sharded_bfloat16_export_loads_back(lora_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sharded"
    result = merge_lora(lora_run, out_dir=out, dtype="bfloat16", shard_size="1MB")
    assert len(result.weight_files) >= 3 and (out / "model.safetensors.index.json").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(result.weight_files)
    assert result.verify.ok and result.verify.details["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert (_logits(out, "bfloat16") - _logits(out, "float32")).abs().max() < 0.1


def test_existing_target_refused_and_overwrite_replaces(lora_run, tmp_path):
    out = tmp_path / "exp"
    first = merge_lora(lora_run, out_dir=out, verify=False)
    assert first.verify is None and json.loads((out / "sage_ft_export.json").read_text())["verify"] is None
    with pytest.raises(ExportError, match="already exists.*overwrite"):
        merge_lora(lora_run, out_dir=out)
    second = merge_lora(lora_run, out_dir=out, overwrite=True, dtype="float16")
    assert second.verify.ok
    assert json.loads((out / "sage_ft_export.json").read_text())["dtype"] == "float16"
    assert _leftovers(tmp_path) == []

    foreign = tmp_path / "my-notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(ExportError, match="not a sage-ft export"):
        merge_lora(lora_run, out_dir=foreign, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "precious"
    # a file where the export (or a folder above it) would go: said plainly, with or without overwrite
    # (below a file it was a bare FileExistsError traceback; on the file, "pass overwrite", which refused)
    for overwrite in (False, True):
        with pytest.raises(ExportError, match="notes.txt is a file, not an export directory"):
            merge_lora(lora_run, out_dir=foreign / "notes.txt", overwrite=overwrite)
    with pytest.raises(ExportError, match="notes.txt is a file, not a folder; choose another output"):
        merge_lora(lora_run, out_dir=foreign / "notes.txt" / "sub", overwrite=True)
    # a name longer than the file system allows: refused before the merge (an OSError traceback after it)
    with pytest.raises(ExportError, match=r"\(311 characters\) cannot be used as a path \(File name too long\)"):
        merge_lora(lora_run, out_dir=Path(f"/tmp/{'x' * 300}/model"))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("cancel_at", ["checking", "merging", "finishing"])
def test_cancel_leaves_nothing_behind(lora_run, tmp_path, cancel_at):
    cancel = threading.Event()

    def progress(stage, fraction):
        if stage == cancel_at:
            cancel.set()

    out = tmp_path / "cancelled"
    with pytest.raises(ExportCancelled, match="cancelled"):
        merge_lora(lora_run, out_dir=out, progress=progress, cancel_event=cancel, verify=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk_space_refused_before_writing(lora_run, tmp_path):
    out = tmp_path / "too-big"
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(ExportError, match="not enough disk space") as err:
        merge_lora(lora_run, out_dir=out, min_free_bytes=free * 2)
    assert "GB is free" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_export_goes_to_exports_dir_by_default(lora_run):
    result = merge_lora(lora_run / "checkpoint-2", verify=False)
    try:
        assert result.out_dir == paths.exports_dir() / "demo-run-checkpoint-2-merged"
        record = json.loads((result.out_dir / "sage_ft_export.json").read_text())
        assert record["checkpoint"] == "checkpoint-2" and record["source_run"] == str(lora_run)
        # the checkpoint holds no tokenizer: the run's lora/ tokenizer is used
        assert (result.out_dir / "tokenizer.json").exists()
        assert (_logits(result.out_dir) - _logits(ensure_demo_model())).abs().max() > 1e-2
        from sage_ft.models.registry import list_models

        listed = [m for m in list_models(kind="merged") if m.path == str(result.out_dir)]
        assert len(listed) == 1 and listed[0].kind == "merged" and listed[0].available
    finally:
        shutil.rmtree(result.out_dir)


def test_bad_inputs_get_clear_errors(lora_run, tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        merge_lora(tmp_path / "nope")
    empty_run = tmp_path / "running-run"
    empty_run.mkdir()
    (empty_run / "finetune_meta.json").write_text('{"status": "running",\n "base_model": }')
    with pytest.raises(ExportError, match=r"finetune_meta.json is not valid JSON \(line 2"):
        merge_lora(empty_run)
    (empty_run / "finetune_meta.json").write_text('{"status": "running"}')
    with pytest.raises(ExportError, match="no LoRA adapter.*'running'"):
        merge_lora(empty_run)
    with pytest.raises(ExportError, match="dtype 'int8' is not one of"):
        merge_lora(lora_run, out_dir=tmp_path / "x", dtype="int8")
    with pytest.raises(ExportError, match="shard size '2 parsecs'"):
        merge_lora(lora_run, out_dir=tmp_path / "x", shard_size="2 parsecs")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("1GiB") == 2**30 and parse_size(500) == 500
    orphan = tmp_path / "orphan-adapter"
    shutil.copytree(lora_run / "lora", orphan)
    cfg = json.loads((orphan / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "deleted-base")
    (orphan / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="deleted-base.*adapter_config.json"):
        merge_lora(orphan)
    assert not (tmp_path / "x").exists()


def test_zip_export_holds_the_model(lora_run, tmp_path):
    out = merge_lora(lora_run, out_dir=tmp_path / "zipme", verify=False).out_dir
    archive = zip_export(out)
    assert archive == tmp_path / "zipme.zip"
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        assert {"zipme/model.safetensors", "zipme/config.json", "zipme/sage_ft_export.json"} <= names
        assert z.getinfo("zipme/model.safetensors").compress_type == zipfile.ZIP_STORED
        assert z.read("zipme/config.json") == (out / "config.json").read_bytes()
    with pytest.raises(ExportError, match="not a directory"):
        zip_export(tmp_path / "missing")


def test_cli_refusals_exit_nonzero_with_message(lora_run, tmp_path, capsys):
    assert cli_main(["export", str(tmp_path / "missing-run")]) == 1
    assert "error:" in capsys.readouterr().err
    assert cli_main(["export", "987654"]) == 1
    assert "no task with id 987654" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert cli_main(["export", str(lora_run), "--out", str(tmp_path / "taken")]) == 1
    assert "already exists" in capsys.readouterr().err
    # a whole model (a base, or an export merged already) is named as such, not as a folder without a LoRA
    assert cli_main(["export", str(ensure_demo_model())]) == 1
    assert "is a whole model already" in capsys.readouterr().err


def test_cli_export_with_gguf_and_zip(lora_run, tmp_path):
    """The installed command, as a user runs it: merge (sharded, verified), GGUF f16, zip."""
    out = tmp_path / "cli-export"
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "sage_ft", "export", str(lora_run), "--out", str(out),
                           "--shard-size", "2MB", "--gguf", "f16", "--zip"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.split()
    gguf_file = out / "gguf" / "cli-export-f16.gguf"
    assert printed == [str(out), str(gguf_file), str(tmp_path / "cli-export.zip")]
    assert "verify merge: ok" in proc.stderr and "verify gguf: ok" in proc.stderr
    assert "[100%] done" in proc.stderr
    # the whole export is timed, each part too (the web UI said the merge's time for the whole job)
    assert re.search(r"exported in [\d.]+ s \(merge [\d.]+ s, GGUF [\d.]+ s, zip [\d.]+ s\)", proc.stderr)
    assert len(list(out.glob("model-*.safetensors"))) >= 2 and gguf_file.exists()
    record = json.loads((out / "sage_ft_export.json").read_text())
    assert record["gguf"][0]["file"] == "gguf/cli-export-f16.gguf" and record["gguf"][0]["verify"]["ok"]


@pytest.mark.slow  # trains once per session (trained_run, shared with other areas) when run alone
def test_really_trained_run_exports_and_answers_like_the_adapter(trained_run, demo_model, tmp_path):
    """The trainer's own output (meta names the base as 'demo'): the merged model gives the trained answer."""
    from tests.fixtures_training import MEMORIZE_QA, generate

    result = merge_lora(trained_run, out_dir=tmp_path / "trained-merged")
    assert result.verify.ok, result.verify
    assert result.base_model == str(demo_model)
    question, answer = MEMORIZE_QA[0]
    merged_answer = generate(result.out_dir, question, max_new_tokens=24)
    assert merged_answer == generate(demo_model, question, adapter=trained_run / "lora", max_new_tokens=24)
    assert answer in merged_answer
    assert answer not in generate(demo_model, question, max_new_tokens=24)
    card = (result.out_dir / "README.md").read_text()
    assert "completed" in card and "learning_rate" in card


@pytest.fixture(scope="module")
def merged_export(lora_run, tmp_path_factory) -> Path:
    """A merged export (sage_ft_export.json and all) to convert and zip."""
    return merge_lora(lora_run, out_dir=tmp_path_factory.mktemp("exports") / "for-gguf", verify=False).out_dir


@pytest.mark.parametrize("cancel_at", ["converting", "verifying (GGUF logits)", "finishing"])
def test_gguf_cancel_leaves_no_file(merged_export, cancel_at):
    """Cancel between tensors (after the first one is written), between verification steps, and at the last
    step before the file takes its name: no GGUF, no partial file, no empty gguf/ folder, nothing recorded."""
    from sage_ft.export import convert_to_gguf

    record = (merged_export / "sage_ft_export.json").read_text()
    cancel, seen = threading.Event(), []

    def progress(stage, fraction):
        seen.append(stage)
        if stage == cancel_at and (stage != "converting" or fraction > 0):
            cancel.set()

    with pytest.raises(ExportCancelled, match=r"GGUF export cancelled while .*; no GGUF file was written"):
        convert_to_gguf(merged_export, outtype="q8_0", progress=progress, cancel_event=cancel)
    assert cancel_at in seen and "done" not in seen
    assert not (merged_export / "gguf").exists()
    assert (merged_export / "sage_ft_export.json").read_text() == record
    assert _leftovers(merged_export) == []


def test_gguf_overwrite_cancelled_while_verifying_keeps_the_old_file(merged_export, tmp_path):
    from sage_ft.export import convert_to_gguf

    old = convert_to_gguf(merged_export, out_file=tmp_path / "m.gguf", outtype="f16", verify=False).path
    before = old.read_bytes()
    cancel = threading.Event()
    with pytest.raises(ExportCancelled, match="while verifying"):
        convert_to_gguf(merged_export, out_file=old, outtype="q8_0", overwrite=True, cancel_event=cancel,
                        progress=lambda stage, f: stage.startswith("verifying") and cancel.set())
    assert old.read_bytes() == before and list(tmp_path.iterdir()) == [old]


def test_zip_cancel_leaves_no_zip_and_keeps_an_existing_one(merged_export, tmp_path):
    archive = tmp_path / "for-gguf.zip"
    archive.write_bytes(b"an earlier download")
    cancel, fractions = threading.Event(), []

    def progress(stage, fraction):
        fractions.append(fraction)
        if fraction > 0:  # the first file is in: cancel before the next one
            cancel.set()

    with pytest.raises(ExportCancelled, match="zip cancelled; no zip file was written"):
        zip_export(merged_export, archive, cancel_event=cancel, progress=progress)
    assert 0 < fractions[-1] < 1
    assert archive.read_bytes() == b"an earlier download" and list(tmp_path.iterdir()) == [archive]
    # uncancelled, it reports up to 1.0 and replaces the old file
    fractions.clear()
    assert zip_export(merged_export, archive, progress=lambda s, f: fractions.append(f)) == archive
    assert fractions[-1] == 1.0 and zipfile.is_zipfile(archive)
