"""Process hygiene of the vLLM child: failed starts, start timeout, port taken, app crash + adoption,
app exit by SIGTERM — checked in the process table by pid, never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sage_ft import process_start
from sage_ft.serving import ServerManager, ServerStartError
from sage_ft.serving import registry as serving_registry
from sage_ft.serving.vllm_server import ServerSpec, VLLMServer
from tests.fixtures_serving import free_port, read_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _my_descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def _wait_gone(pids, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = _alive(pids)
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = _alive(alive)
    return alive


def test_failed_start_bad_model_is_clear_and_leaves_no_process(serving_demo_model, tmp_path):
    bad = tmp_path / "unsupported-model"
    shutil.copytree(serving_demo_model, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["BogusForCausalLM"]
    (bad / "config.json").write_text(json.dumps(config))
    before = _my_descendants()
    seen: set[int] = set()
    manager = ServerManager(str(bad), port=free_port(), install_exit_handlers=False)
    with pytest.raises(ServerStartError) as info:
        manager.start(progress=lambda p: seen.update(_my_descendants() - before), timeout_s=600)
    assert "exited with code" in str(info.value) and "BogusForCausalLM" in str(info.value), str(info.value)
    assert info.value.log_tail and Path(info.value.log_path).is_file()
    assert seen and _wait_gone(seen) == []
    status = manager.status()
    assert status["state"] == "stopped" and "BogusForCausalLM" in status["last_error"]
    assert not [e for e in serving_registry.read_entries() if e["pid"] in seen]
    # the same failure through a switch (as the Chat tab makes it) carries that start's log, to offer it
    result = manager.switch(str(bad), timeout_s=600)
    assert result.outcome == "failed" and "BogusForCausalLM" in Path(result.log_path).read_text(errors="replace")


def test_start_timeout_ends_the_whole_process_group(serving_demo_model):
    """A server that hangs while starting is ended at the timeout with every process of its group.
    The hang is real: each child (engine core, workers) is frozen with SIGSTOP as it appears, so the
    server never becomes ready however fast this machine starts vLLM (it once did within 25 s), and
    the frozen children can only be ended by the SIGKILL that follows an ignored SIGTERM.
    The budget is 90 s, not less: vLLM's first child appears only after the server has imported
    vLLM, which took over 30 s while another test worker loaded this 2-core machine."""
    budget_s = 90
    server = VLLMServer(ServerSpec(str(serving_demo_model), "demo", free_port()))
    stages, members = [], set()

    def progress(p):
        stages.append(p.stage)
        if not server.pid:
            return
        for child in psutil.Process(server.pid).children(recursive=True):
            if child.pid not in members:
                members.add(child.pid)
                with contextlib.suppress(psutil.Error):
                    child.suspend()

    try:
        with pytest.raises(ServerStartError, match=f"did not become ready within {budget_s} s"):
            server.start(timeout_s=budget_s, progress=progress)
    finally:
        server.stop()  # a no-op after a failed start; ends the server should it ever become ready
    assert stages and stages[0] == "launching process"
    assert members, f"vLLM started no child process within {budget_s} s"
    assert _wait_gone({server.pid, *members}) == []
    assert not [e for e in serving_registry.read_entries() if e["pid"] == server.pid]


_ADOPT_SCRIPT = """
import json, signal, sys
from sage_ft.serving import ServerManager
m = ServerManager("demo", port=int(sys.argv[1]))
m.start()
print(json.dumps(m.status()), flush=True)
signal.pause()
"""


def test_cli_serve_port_taken_app_crash_adoption_and_sigterm(data_home, serving_demo_model):
    from openai import OpenAI

    env = dict(os.environ, SAGE_FT_HOME=str(data_home))  # (--another: the session's shared server may run there)
    port = free_port()
    with socket.socket() as blocker:  # another program holds the preferred port
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        app = subprocess.Popen([sys.executable, "-m", "sage_ft", "serve", "--model", "demo", "--port", str(port),
                                "--max-model-len", "512", "--another"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        try:
            lines = read_until(app.stdout, "API key:", timeout=900)
        finally:
            if app.poll() is not None:
                pytest.fail(f"sage-ft serve exited early: {lines}")
        info = _endpoint_of(lines)
        base_url, api_key = info["base URL"], info["API key"]
        assert info["context"] == "512 tokens"
        assert base_url.startswith("http://127.0.0.1:") and not base_url.startswith(f"http://127.0.0.1:{port}/")
        reply = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60).chat.completions.create(
            model=info["model"], messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.choices[0].message.content

    entry = next(e for e in serving_registry.read_entries() if e["port"] == int(base_url.rsplit(":", 1)[1][:-3]))
    server_pids = {entry["pid"], *(c.pid for c in psutil.Process(entry["pid"]).children(recursive=True))}
    app.kill()  # kill -9 of the app: its server survives as an orphan ...
    app.wait(timeout=30)
    assert process_start.is_running(entry["pid"], entry["create_time"])

    # ... and the next app adopts it (same pid: no second start), then stops it on SIGTERM
    second = subprocess.Popen([sys.executable, "-c", _ADOPT_SCRIPT, str(port)], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        status_lines = read_until(second.stdout, '"state"', timeout=300)
        status = json.loads(status_lines[-1])
        assert status["state"] == "ready" and status["pid"] == entry["pid"], status
        assert status["context_len"] == 512  # read back from the adopted server, not the adopter's default
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    finally:
        if second.poll() is None:
            second.kill()
    assert _wait_gone(server_pids) == []
    assert not [e for e in serving_registry.read_entries() if e["pid"] == entry["pid"]]


def test_cli_serve_prints_the_new_endpoint_after_a_switch_from_another_terminal(tmp_path, serving_demo_model,
                                                                               serving_adapters):
    """`sage-ft switch` asks the `sage-ft serve` process to switch; its clients need the new model
    name, so serve prints the endpoint again (it printed it once, at the start)."""
    from openai import OpenAI

    env = dict(os.environ, SAGE_FT_HOME=str(tmp_path / "home"))  # this serve is the only server there
    serve = subprocess.Popen([sys.executable, "-m", "sage_ft", "serve", "--model", str(serving_demo_model),
                              "--port", str(free_port()), "--max-model-len", "512"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        first = _endpoint_of(read_until(serve.stdout, "log:", timeout=900))
        assert first.get("model"), f"sage-ft serve printed no endpoint (exit code {serve.poll()})"
        proc = subprocess.run([sys.executable, "-m", "sage_ft", "switch", str(serving_adapters["b"])], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith("✅"), proc.stdout + proc.stderr[-2000:]
        lines = read_until(serve.stdout, "log:", timeout=30)
        assert any(line.startswith("the chat model changed") for line in lines), lines
        now = _endpoint_of(lines)
        assert now["model"] != first["model"] and now["base URL"] == first["base URL"]
        reply = OpenAI(base_url=now["base URL"], api_key=now["API key"], max_retries=0, timeout=60).chat.completions.create(
            model=now["model"], messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert reply.model == now["model"] and reply.choices[0].message.content
    finally:
        serve.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            serve.wait(timeout=60)
        if serve.poll() is None:
            serve.kill()


def _endpoint_of(lines: list[str]) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in lines if ":" in ln)}


_START_ON_A_THREAD = """
import signal, sys, threading
from sage_ft.serving import ServerManager
m = ServerManager("demo", port=int(sys.argv[1]))
threading.Thread(target=m.switch, args=("demo",), daemon=True).start()  # as the web app starts it
signal.pause()
"""


def test_sigterm_while_the_server_starts_leaves_no_child(data_home, serving_demo_model):
    """The web app starts its chat server on a thread. SIGTERM (or Ctrl-C) in the half minute that
    start takes used to leave the half-started vLLM running: closing stopped only a server that was
    ready. Now the starting server's whole process group is ended too."""
    from sage_ft.serving.vllm_server import group_members

    app = subprocess.Popen([sys.executable, "-c", _START_ON_A_THREAD, str(free_port())],
                           env=dict(os.environ, SAGE_FT_HOME=str(data_home)), cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    leader = None
    try:
        deadline = time.monotonic() + 120
        while leader is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                leader = next((c.pid for c in psutil.Process(app.pid).children()
                               if "vllm.entrypoints" in " ".join(c.cmdline())), None)
            time.sleep(0.2)
        assert leader is not None, "the app launched no vLLM child within 120 s"
        assert not any(e["pid"] == leader and e.get("current") for e in serving_registry.read_entries())
        app.send_signal(signal.SIGTERM)  # seconds into a start that takes ~20 s here
        app.wait(timeout=60)
    finally:
        if app.poll() is None:
            app.kill()
    deadline = time.monotonic() + 30
    while group_members(leader) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = group_members(leader)
    for proc in left:  # ended, so a failure here leaves nothing running for the next tests
        with contextlib.suppress(psutil.Error):
            proc.kill()
    assert left == [], "the half-started vLLM outlived the app"
    assert not [e for e in serving_registry.read_entries() if e["pid"] == leader]
