"""The built-in demo model: offline, deterministic, loadable like any HF model, vLLM-compatible shape."""

from __future__ import annotations

import json
from pathlib import Path

from sage_ft.models.demo import build_demo_model, is_demo_model


def test_demo_model_is_a_normal_hf_directory(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = build_demo_model(tmp_path / "demo")
    assert is_demo_model(path)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] >= 64  # vLLM CPU attention
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello 你好"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nHello 你好<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text  # byte-level BPE: any text round-trips
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_an_untrained_reply_is_visible_text_that_is_not_ended_by_chance(demo_model: Path) -> None:
    """The Chat and its streaming tests need a greedy reply of the untrained demo to show text and run to
    max_tokens. With every weight random, the end-of-turn token came out on top wherever it happened to
    (one build ended a reply after one token on the vLLM server), and so did tokens of white space only
    (another answered "Hello" with eight blank lines), and pieces of characters showed as U+FFFD. Their
    output rows are scaled down (``QUIET_ROW_SCALE``): over a long chat none of them ranks near the top,
    fp32 or bf16 (unscaled, the end-of-turn token ranked 33rd of 2,048 at best there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sage_ft.models.demo import CORPUS_FILE, quiet_token_ids

    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    quiet = quiet_token_ids(tokenizer)
    assert quiet[0] == tokenizer.eos_token_id and tokenizer.convert_tokens_to_ids("Ċ") in quiet  # "\n"
    paragraphs = [p[:300] for p in CORPUS_FILE.read_text().split("\n\n") if len(p) > 40]  # fixed: no edit moves it
    chat = [{"role": ("user", "assistant")[i % 2], "content": p} for i, p in enumerate(paragraphs[:40])]
    ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"][:, :2048]
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=dtype).eval()
        with torch.no_grad():
            logits = model(ids).logits[0].float()
        best_quiet = logits[:, quiet].max(-1, keepdim=True).values
        ranks = (logits > best_quiet).sum(-1)  # 0: a quiet token would be picked
        assert int(ranks.min()) >= 20, (dtype, int(ranks.min()))


def test_demo_model_build_is_deterministic_and_idempotent(tmp_path: Path) -> None:
    a = build_demo_model(tmp_path / "a")
    b = build_demo_model(tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
    mtime = (a / "model.safetensors").stat().st_mtime
    assert build_demo_model(a) == a and (a / "model.safetensors").stat().st_mtime == mtime
    assert not list(tmp_path.glob(".demo-build-*"))  # no staging leftovers


def test_app_start_with_the_demo_built_loads_no_torch(demo_model: Path, tmp_path: Path) -> None:
    """`python webui.py` checks for the demo model on every start; with it built, torch must not be
    loaded (it costs ~400 MB and seconds; it loads when a run or a chat needs it)."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    from sage_ft import paths
    from tests.fixtures_webui import free_port, stop_app_process

    home = tmp_path / "home"
    shutil.copytree(demo_model, home / "models" / demo_model.name)
    port = free_port()
    log = (tmp_path / "webui.log").open("w")
    proc = subprocess.Popen([sys.executable, "webui.py", "--no-llm", "--port", str(port), "--data-home", str(home)],
                            cwd=paths.project_root(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "webui.log").read_text()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        time.sleep(3)  # the start-up's demo check runs on a thread after the first page
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps
        assert (tmp_path / "webui.log").read_text().count("Writing model shards") == 0  # nothing rebuilt
    finally:
        stop_app_process(proc)


def test_two_threads_asking_for_the_demo_on_a_fresh_home_both_get_it(tmp_path: Path) -> None:
    """On a fresh data home the app's start-up check and the chat server's first start ask for the
    demo at the same moment (in a process that has not imported transformers yet): both must get the
    one built model, not an ImportError from two concurrent transformers imports or a half-renamed
    folder."""
    import subprocess
    import sys

    code = ("import sys, threading\n"
            "from sage_ft.models.demo import build_demo_model, is_demo_model\n"
            "results, errors = [], []\n"
            "def ask():\n"
            "    try:\n"
            "        results.append(build_demo_model(sys.argv[1]))\n"
            "    except Exception as exc:\n"
            "        errors.append(repr(exc))\n"
            "threads = [threading.Thread(target=ask) for _ in range(3)]\n"
            "[t.start() for t in threads]; [t.join() for t in threads]\n"
            "assert errors == [], errors\n"
            "assert len(set(results)) == 1 and is_demo_model(results[0]), results\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "demo")], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
