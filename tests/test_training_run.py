"""Real LoRA runs on the demo model: learning, events/state, cancel, pause, eval, failures."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from sage_ft.config import ConfigError
from sage_ft.events import read_events
from sage_ft.training import FineTuneRun, read_meta
from tests.fixtures_data import memorize_rows, write_jsonl
from tests.fixtures_training import (
    MEMORIZE_QA,
    TRAINED_RUN_LOGGING_STEPS,
    TRAINED_RUN_SAVE_STEPS,
    TRAINED_RUN_STEPS,
    answer_loss,
    generate,
    training_config,
)


def events_of(run_dir: Path) -> list[dict]:
    return read_events(run_dir / "events.jsonl")[0]


def test_loss_falls_and_the_adapter_changes_generations(trained_run: Path, demo_model: Path) -> None:
    meta = read_meta(trained_run)
    assert meta["status"] == "completed" and meta["error"] is None
    metrics = meta["metrics"]
    assert metrics["final_loss"] < metrics["first_loss"] / 2
    question, answer = MEMORIZE_QA[0]
    base = generate(demo_model, question)
    tuned = generate(demo_model, question, adapter=trained_run / "lora")
    assert tuned != base
    assert "pineapple" in tuned  # the memorised answer


def test_run_directory_meta_events_and_state_agree(trained_run: Path, demo_model: Path) -> None:
    for name in ("lora/adapter_config.json", "lora/adapter_model.safetensors", "lora/tokenizer.json",
                 "config.yaml", "logs.txt", "events.jsonl", f"checkpoint-{TRAINED_RUN_STEPS}/trainer_state.json"):
        assert (trained_run / name).exists(), name
    meta = read_meta(trained_run)
    assert meta["base_model_path"] == str(demo_model)
    assert meta["dataset_info"]["rows_used"] == len(MEMORIZE_QA)
    assert meta["lora"]["rank"] == 32 and meta["lora"]["alpha"] == 64 and meta["lora"]["trainable_params"] > 0
    assert set(meta["versions"]) >= {"torch", "transformers", "peft", "sage_ft"}
    assert meta["config"]["max_steps"] == TRAINED_RUN_STEPS and 0 <= meta["padding_fraction"] < 1
    assert meta["finished_at"] >= meta["started_at"]
    preparing = [(e["phase"], e.get("done"), e.get("total")) for e in events_of(trained_run) if e["event"] == "preparing"]
    assert preparing == [("data", None, None), ("tokenize", 0, 4), ("tokenize", 4, 4), ("model", None, None)]
    data_lines = [e for e in events_of(trained_run) if e["event"] == "log" and e.get("source") == "data"]
    assert len(data_lines) == 1 and "train" in data_lines[0]["message"]  # the run's data line, for the CLI
    all_kinds = [e["event"] for e in events_of(trained_run) if e["event"] != "log"]
    assert all_kinds[:4] == ["preparing"] * 4 and "preparing" not in all_kinds[4:]  # all before step 1
    events = [e for e in events_of(trained_run) if e["event"] not in ("preparing", "log")]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "training_start" and kinds[-1] == "training_end"
    assert events[0]["total_steps"] == TRAINED_RUN_STEPS and events[0]["output_dir"] == str(trained_run)
    metric_steps = [e["step"] for e in events if e["event"] == "metric_update"]
    assert metric_steps == list(range(TRAINED_RUN_LOGGING_STEPS, TRAINED_RUN_STEPS + 1, TRAINED_RUN_LOGGING_STEPS))
    last = [e for e in events if e["event"] == "metric_update"][-1]
    assert last["loss"] == pytest.approx(meta["metrics"]["final_loss"])
    assert last["tokens_per_second"] > 0 and last["total_steps"] == TRAINED_RUN_STEPS
    # every step sees the whole set (4 rows, batch 4): the host-side count is exact
    assert meta["metrics"]["tokens_seen"] == TRAINED_RUN_STEPS * meta["dataset_info"]["token_stats"]["total_tokens"]
    assert [e["step"] for e in events if e["event"] == "checkpoint_saved"] == list(
        range(TRAINED_RUN_SAVE_STEPS, TRAINED_RUN_STEPS + 1, TRAINED_RUN_SAVE_STEPS))
    assert kinds.count("epoch_start") == kinds.count("epoch_end") == TRAINED_RUN_STEPS  # 4 rows, batch 4
    assert events[-1]["status"] == "completed" and events[-1]["metrics"]["global_step"] == TRAINED_RUN_STEPS
    log = (trained_run / "logs.txt").read_text()
    assert f"step {TRAINED_RUN_STEPS}/{TRAINED_RUN_STEPS}" in log and "completed" in log


def test_cancel_mid_run_saves_a_usable_adapter(demo_model: Path, memorize_jsonl: Path, tmp_path: Path) -> None:
    run = FineTuneRun(training_config(memorize_jsonl, tmp_path / "run", max_steps=500))
    run.emitter.on("batch_end", lambda e: run.cancel() if e["step"] >= 3 else None)
    result = run.run()
    assert result.status == "cancelled" and result.error is None
    steps = result.metrics["global_step"]
    assert steps == 3  # stopped within one step of the request
    state = run.get_current_state()
    assert state["status"] == "cancelled" and not state["is_training"] and state["current_step"] == steps
    assert read_meta(result.output_dir)["status"] == "cancelled"
    assert events_of(result.output_dir)[-1]["status"] == "cancelled"
    _assert_adapter_loads_and_acts(demo_model, result.output_dir / "lora")


def _assert_adapter_loads_and_acts(model_dir: Path, adapter: Path) -> None:
    """The saved adapter loads with peft and changes the model's (finite) next-token logits.

    (Greedy text after a few steps may well be empty — an early EOS — so logits are compared.)
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer(MEMORIZE_QA[0][0], return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(adapter))(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def test_a_4bit_base_qlora_run_learns_and_its_adapter_answers_on_the_full_precision_base(
        demo_model: Path, memorize_jsonl: Path, tmp_path: Path) -> None:
    """``quantization_bit: 4`` (QLoRA): the base's linear layers are loaded in 4 bits by bitsandbytes
    (on this CPU too), the LoRA learns on top, and the adapter then answers on the unquantized base,
    as vLLM serves it; ``merge_lora`` merges it into the full-precision base, not into 4-bit weights."""
    # 160 steps where the unquantized run memorises in 60: nf4 rounds this tiny random model's weights
    # coarsely, so the adapter has more to make up (measured: loss 4.0 after 60 steps, 3.2 after 100, 2.7
    # after 160; at 100 the answer on the full-precision base came out "pineappor" once in a few CI runs).
    config = training_config(memorize_jsonl, tmp_path / "run", max_steps=160, quantization_bit=4, merge_lora=True)
    result = FineTuneRun(config).run()
    assert result.status == "completed", result.error
    meta = read_meta(result.output_dir)
    assert meta["quantization"] == {"bits": 4, "type": "nf4", "double_quantization": True}
    assert meta["config"]["quantization_bit"] == "4"
    assert meta["metrics"]["final_loss"] < meta["metrics"]["first_loss"] / 2
    # On the full-precision base the adapter knows the answer (loss 7.5 -> 2.7 measured) and answers in
    # its words. Not "pineapple" whole: the run is not bit-for-bit repeatable, and one CI run's reply
    # was "The secret word isapple." (nf4 leaves this tiny model's adapter at loss ~2.7, see above).
    question, answer = MEMORIZE_QA[0]
    adapter = result.output_dir / "lora"
    tuned = answer_loss(demo_model, question, answer, adapter=adapter)
    assert tuned < answer_loss(demo_model, question, answer) / 2
    assert generate(demo_model, question, adapter=adapter).startswith("The secret word is")
    merged = result.output_dir / "merged_model"
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert answer_loss(merged, question, answer) == pytest.approx(tuned, abs=1e-3)  # merged into the fp weights


def test_the_same_seed_trains_the_same_adapter(memorize_jsonl: Path, tmp_path: Path) -> None:
    """A run is reproducible from its config: the adapter's random init is seeded too (torch's own
    generator starts from a different seed in every process, and an earlier run moves it)."""
    from safetensors.torch import load_file

    def adapter(name: str, seed: int) -> dict:
        result = FineTuneRun(training_config(memorize_jsonl, tmp_path / name, max_steps=2, seed=seed)).run()
        assert result.status == "completed", result.error
        return load_file(result.output_dir / "lora" / "adapter_model.safetensors")

    first, again, other = adapter("a", 7), adapter("b", 7), adapter("c", 8)
    assert first.keys() == again.keys() == other.keys()
    assert all(first[k].equal(again[k]) for k in first)
    assert not all(first[k].equal(other[k]) for k in first)


def test_micro_batches_by_token_budget_train_the_same_steps_in_fewer_passes(tmp_path: Path) -> None:
    """batch 2 x accumulation 4 with ``micro_batch_by_tokens: on`` trains exactly the steps of batch 8 x 1 (the
    same 8 samples per step; the loss is normalised over the step's label tokens), in fewer than 4 passes
    per step where the step's samples are short. Off (auto on a CPU), batch 2 x 4 groups other samples
    into each step."""
    import random

    from safetensors.torch import load_file

    rng = random.Random(5)
    words = "alpha beta gamma delta river stone cloud light north quiet".split()
    rows = [{"instruction": " ".join(rng.choice(words) for _ in range(rng.choice((2, 3, 40, 80)))),
             "output": " ".join(rng.choice(words) for _ in range(rng.randint(2, 12)))} for _ in range(32)]
    data = tmp_path / "lengths.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    def run(name: str, batch: int, accumulation: int, by_tokens: str = "on"):
        result = FineTuneRun(training_config(data, tmp_path / name, max_steps=4, per_device_train_batch_size=batch,
                                             gradient_accumulation_steps=accumulation,
                                             micro_batch_by_tokens=by_tokens)).run()
        assert result.status == "completed", result.error
        losses = [e["loss"] for e in events_of(result.output_dir) if e["event"] == "metric_update" and "loss" in e]
        return result.metrics, losses, load_file(result.output_dir / "lora" / "adapter_model.safetensors")

    whole, whole_losses, whole_adapter = run("whole", 8, 1)
    split, split_losses, split_adapter = run("split", 2, 4)
    fixed, _, fixed_adapter = run("fixed", 2, 4, by_tokens="auto")  # auto: off on a CPU
    assert whole["micro_batches_per_step"] == 1 and fixed["micro_batches_per_step"] == 4
    assert 1 < split["micro_batches_per_step"] < 4  # short steps in one pass, long ones split
    assert split["tokens_seen"] == whole["tokens_seen"]
    assert split_losses == pytest.approx(whole_losses, rel=1e-4) and len(whole_losses) == 4
    # Adam turns float noise in near-zero gradients into small weight differences, so compare the
    # whole adapter by norm: summation-order noise (~1e-5) vs other samples per step (~0.3).
    assert relative_difference(split_adapter, whole_adapter) < 1e-3
    assert relative_difference(fixed_adapter, whole_adapter) > 0.05  # the check can tell


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return diff / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


def test_torch_compile_trains_the_same_run(demo_model: Path, memorize_jsonl: Path, tmp_path: Path) -> None:
    """Regional torch.compile (with gradient checkpointing around the compiled layers): the same
    per-step losses as eager, a note in the events, an adapter peft loads, and dynamo's caches
    dropped afterwards (a later run in the app would otherwise pile up recompilations)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # the demo model's layers

    def losses(result) -> list[float]:
        return [e["loss"] for e in events_of(result.output_dir) if e["event"] == "metric_update" and "loss" in e]

    def compiled_entries() -> int:  # dynamo's cache entries (compiled graphs) of the layers' forward
        return torch._dynamo.convert_frame._get_total_cache_entry_count(LlamaDecoderLayer.forward)

    eager = FineTuneRun(training_config(memorize_jsonl, tmp_path / "eager", max_steps=4)).run()
    run = FineTuneRun(training_config(memorize_jsonl, tmp_path / "compiled", max_steps=4, torch_compile=True,
                                      gradient_checkpointing=True))
    during: list[int] = []
    run.emitter.on("batch_end", lambda e: during.append(compiled_entries()))
    compiled = run.run()
    assert eager.status == compiled.status == "completed", compiled.error
    assert losses(compiled) == pytest.approx(losses(eager), rel=1e-4) and len(losses(eager)) == 4
    assert read_meta(compiled.output_dir)["torch_compile_layers"] == 2  # the demo model's decoder layers
    notes = [e for e in events_of(compiled.output_dir) if e["event"] == "log" and e.get("source") == "torch_compile"]
    assert notes and "first step" in notes[0]["message"]
    _assert_adapter_loads_and_acts(demo_model, compiled.output_dir / "lora")
    assert min(during) > 0 and compiled_entries() == 0  # the layers ran compiled; the caches went with the run


def test_torch_compile_failure_says_to_turn_it_off(memorize_jsonl: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler for inductor (a CPU machine without one): the run fails with a one-line reason
    naming the setting, not a compiler traceback."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor, "force_disable_caches", True)  # a cached kernel would need no compiler
    monkeypatch.setattr(inductor.cpp, "cxx", (str(tmp_path / "no-such-g++"),))
    result = FineTuneRun(training_config(memorize_jsonl, tmp_path / "run", max_steps=2, torch_compile=True)).run()
    assert result.status == "failed"
    assert result.error.startswith("torch_compile failed (") and "turn torch_compile off" in result.error
    assert "\n" not in result.error


def test_pause_resume_and_eval_loss(memorize_jsonl: Path, tmp_path: Path) -> None:
    config = training_config(memorize_jsonl, tmp_path / "run", max_steps=6, val_size=1, eval_steps=2,
                             per_device_train_batch_size=2)
    run = FineTuneRun(config)
    run.emitter.on("batch_end", lambda e: run.pause() if e["step"] == 2 else None)
    result_box: list = []
    thread = threading.Thread(target=lambda: result_box.append(run.run()))
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while run.get_current_state()["status"] != "paused":
            assert time.monotonic() < deadline and thread.is_alive(), run.get_current_state()
            time.sleep(0.05)
        time.sleep(0.5)
        state = run.get_current_state()
        assert state["status"] == "paused" and state["current_step"] == 2 and state["is_training"]
    finally:
        run.resume()
        thread.join(120)
    [result] = result_box
    assert result.status == "completed" and result.metrics["global_step"] == 6
    evals = [e for e in events_of(result.output_dir) if e["event"] == "metric_update" and e.get("eval_loss")]
    assert [e["step"] for e in evals] == [2, 4, 6]
    assert result.metrics["eval_loss"] == pytest.approx(evals[-1]["eval_loss"])
    assert read_meta(result.output_dir)["dataset_info"]["samples_eval"] == 1


def test_eval_loss_on_a_separate_eval_dataset(memorize_jsonl: Path, tmp_path: Path) -> None:
    """eval_dataset: every training row trains, the eval loss comes from the other data (here a Hub-style
    folder, whose validation split is read), evaluated every eval_steps."""
    folder = tmp_path / "hub-dataset"
    write_jsonl(memorize_rows()[:1], folder / "data" / "validation-00000-of-00001.jsonl")
    write_jsonl(memorize_rows(), folder / "data" / "train-00000-of-00001.jsonl")
    config = training_config(memorize_jsonl, tmp_path / "run", max_steps=4, eval_steps=2, eval_dataset=str(folder),
                             per_device_train_batch_size=2)
    result = FineTuneRun(config).run()
    assert result.status == "completed", result.error
    evals = [e for e in events_of(result.output_dir) if e["event"] == "metric_update" and e.get("eval_loss")]
    assert [e["step"] for e in evals] == [2, 4]
    info = read_meta(result.output_dir)["dataset_info"]
    assert info["samples_eval"] == 1 and info["samples_train"] == len(MEMORIZE_QA)
    assert info["eval_files"] == [str(folder / "data" / "validation-00000-of-00001.jsonl")]


def _assert_failed(result, *needles: str) -> None:
    assert result.status == "failed"
    for needle in needles:
        assert needle in result.error
    assert read_meta(result.output_dir)["status"] == "failed"
    assert read_meta(result.output_dir)["error"] == result.error
    events = events_of(result.output_dir)
    assert [e for e in events if e["event"] == "error_occurred"][0]["error"] == result.error
    assert events[-1]["event"] == "training_end" and events[-1]["status"] == "failed"
    log = (result.output_dir / "logs.txt").read_text()
    assert result.error.splitlines()[0] in log
    assert "Traceback" not in log  # the message says what to do; a traceback would bury it (a ModelError had one)


def test_missing_model_files_fail_the_run_with_the_path(demo_model: Path, memorize_jsonl: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(demo_model, tmp_path / "broken-model")
    (broken / "model.safetensors").unlink()
    result = FineTuneRun(training_config(memorize_jsonl, tmp_path / "run", model_name_or_path=str(broken))).run()
    _assert_failed(result, str(broken), "weights")


def test_nan_loss_fails_the_run(demo_model: Path, memorize_jsonl: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = shutil.copytree(demo_model, tmp_path / "nan-model")
    weights = load_file(bad / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.0.mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")  # one bad value poisons every forward pass
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    result = FineTuneRun(training_config(memorize_jsonl, tmp_path / "run", model_name_or_path=str(bad),
                                         max_steps=5)).run()
    _assert_failed(result, "nan", "step 1", "learning_rate")


def test_dataset_without_usable_rows_fails_before_training(tmp_path: Path) -> None:
    data = tmp_path / "empty.jsonl"
    data.write_text(json.dumps({"instruction": "Q", "output": ""}) + "\n", encoding="utf-8")
    result = FineTuneRun(training_config(data, tmp_path / "run")).run()
    _assert_failed(result, "empty.jsonl")
    assert not (result.output_dir / "lora").exists()


def test_unknown_lora_target_lists_available_modules(memorize_jsonl: Path, tmp_path: Path) -> None:
    result = FineTuneRun(training_config(memorize_jsonl, tmp_path / "run", lora_target="q_proj,attn_qkv")).run()
    _assert_failed(result, "attn_qkv", "q_proj", "down_proj")


def test_output_dir_in_use_is_refused(memorize_jsonl: Path, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "something.txt").write_text("x")
    with pytest.raises(ConfigError, match="already exists"):
        FineTuneRun(training_config(memorize_jsonl, tmp_path / "run"))
    assert FineTuneRun(training_config(memorize_jsonl, tmp_path / "run", overwrite_output_dir=True)).output_dir


def test_default_output_dir_is_under_the_data_home(memorize_jsonl: Path, data_home: Path) -> None:
    run = FineTuneRun(training_config(memorize_jsonl, "", run_name="my run"))
    assert run.output_dir.parent == data_home / "runs" and run.output_dir.name.startswith("my-run-")
    twin = FineTuneRun(training_config(memorize_jsonl, "", run_name="my run"))
    assert twin.output_dir != run.output_dir  # two runs started in the same second never share a folder
