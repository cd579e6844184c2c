"""An export is never overwritten while a chat server serves it (a server keeps the weights it loaded: the
chat would name the new export but answer with the old weights). Real servers: this process's in-process
chat (transformers backend) and a real vLLM server owned by another live sage-ft process, refused in the
core, the CLI (a real ``sage-ft export`` process) and the web app (real HTTP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sage_ft import paths
from sage_ft.export import ExportError, merge_lora
from tests.fixtures_serving import free_port, make_lora_adapter
from tests.fixtures_webui import start_webui


@pytest.fixture(scope="module")
def adapters(demo_model, tmp_path_factory) -> list[Path]:
    """Two different LoRA adapters of the demo model: each export records which one it holds."""
    root = tmp_path_factory.mktemp("served_adapters")
    return [make_lora_adapter(demo_model, root / f"adapter-{seed}", seed=seed) for seed in (1, 2)]


def _exported_adapter(out: Path) -> str:
    return json.loads((out / "sage_ft_export.json").read_text())["adapter_dir"]


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_overwrite_refused_while_this_process_chats_with_it(adapters, tmp_path):
    from sage_ft.serving import ServerManager

    out = tmp_path / "mymerge"
    merge_lora(adapters[0], out_dir=out, verify=False)
    manager = ServerManager("demo", backend="transformers", adopt=False, install_exit_handlers=False)
    try:
        assert manager.switch(out).outcome == "live"
        with pytest.raises(ExportError) as err:
            merge_lora(adapters[1], out_dir=out, overwrite=True, verify=False, chat_manager=manager)
        message = str(err.value)
        assert f"refusing to overwrite {out}: it is being served" in message
        assert "this sage-ft process (in-process transformers backend)" in message
        assert repr(manager.current.label) in message
        assert "Switch the chat to another model first" in message and "export under another name" in message
        assert _exported_adapter(out) == str(adapters[0]) and _leftovers(tmp_path) == []

        # The chat switches to the export while a new merge runs: refused at the swap, the served one intact.
        assert manager.switch("demo").outcome == "live"
        switched = []

        def switch_during_merge(stage: str, fraction: float) -> None:
            if stage == "saving" and not switched:
                switched.append(manager.switch(out).outcome)

        with pytest.raises(ExportError, match="it is being served"):
            merge_lora(adapters[1], out_dir=out, overwrite=True, verify=False, chat_manager=manager,
                       progress=switch_during_merge)
        assert switched == ["live"]
        assert _exported_adapter(out) == str(adapters[0]) and _leftovers(tmp_path) == []

        # Switched away, the same overwrite goes through.
        assert manager.switch("demo").outcome == "live"
        merge_lora(adapters[1], out_dir=out, overwrite=True, verify=False, chat_manager=manager)
        assert _exported_adapter(out) == str(adapters[1])
    finally:
        manager.close()


_SERVE = textwrap.dedent("""
    import sys
    from sage_ft.serving import ServerManager
    manager = ServerManager(sys.argv[1], port=int(sys.argv[2]), max_model_len=512)
    manager.start()
    print("ready", manager.status()["pid"], flush=True)
    sys.stdin.read()  # until the test closes stdin (or SIGTERM: the manager's exit handler stops vLLM)
    manager.close()
""")


@pytest.mark.slow  # starts a vLLM server of its own (the export must be what it serves)
def test_overwrite_refused_while_another_sage_ft_process_serves_it_on_vllm(adapters, tmp_path):
    out = paths.exports_dir() / "mymerge-vllm"
    merge_lora(adapters[0], out_dir=out, verify=False)
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as log_file:
        server = subprocess.Popen([sys.executable, "-c", _SERVE, str(out), str(port)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=log_file, text=True, start_new_session=True)
    app = None
    try:
        line = ""
        while not line.startswith("ready"):  # until the server is verified ready (or the process ended)
            line = server.stdout.readline()
            assert line, f"the vLLM server did not start (exit status {server.wait()}):\n{log.read_text()[-3000:]}"
        vllm_pid = int(line.split()[1])
        who = f"the vLLM chat server on port {port} (pid {vllm_pid}) of sage-ft process {server.pid}"

        # the CLI, as a user runs it
        cli = subprocess.run([sys.executable, "-m", "sage_ft", "export", str(adapters[1]), "--out", str(out),
                              "--overwrite", "--no-verify"], capture_output=True, text=True, timeout=300)
        assert cli.returncode == 1, cli.stderr
        assert f"error: refusing to overwrite {out}: it is being served ({who} serves it as " in cli.stderr
        assert "`sage-ft switch MODEL`" in cli.stderr and "Traceback" not in cli.stderr

        # the web app (its own chat is off: only the registry knows about the other process's server)
        app = start_webui(tmp_path / "webui", start_worker=False)
        progress, result, _ = app.client().predict(str(adapters[1]), "auto", "2GB", out.name, True, False, "none",
                                                   False, "en", api_name="/export_start")
        assert result.startswith("❌") and who in result and "export under another name" in result, result
        assert 'data-state="refused"' in progress and "checking" not in progress
        assert _exported_adapter(out) == str(adapters[0]) and _leftovers(out.parent) == []
    finally:
        if app is not None:
            app.close()
        server.stdin.close()
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
    # once that server has stopped, the same overwrite goes through
    deadline = time.monotonic() + 30
    while True:
        try:
            merge_lora(adapters[1], out_dir=out, overwrite=True, verify=False)
            break
        except ExportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
    assert _exported_adapter(out) == str(adapters[1])
