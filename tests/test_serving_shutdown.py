"""How sage-ft processes end: SIGTERM runs the same clean-up as Ctrl-C, and the servers a kill -9 leaves
without their sage-ft process are ended by `sage-ft serve --stop-orphans` (real processes and signals).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from sage_ft import process_start
from sage_ft.serving.vllm_server import group_members
from tests.fixtures_serving import free_port, read_until

ROOT = Path(__file__).resolve().parent.parent

_WAITS_FOR_SIGTERM = """
import signal, sys
from sage_ft.serving import ServerManager
manager = ServerManager(backend="none")  # installs the serving exit handlers, as every app's manager does
try:
    print("ready", flush=True)
    signal.pause()
finally:
    open(sys.argv[1], "w").write("clean-up ran")
"""


def test_sigterm_lets_the_programs_own_clean_up_run(tmp_path):
    """The serving SIGTERM handler passed the signal on to the default handler, which ends the process
    on the spot: no ``finally`` ran (the web app's download folder stayed in /tmp)."""
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _WAITS_FOR_SIGTERM, str(marker)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
    assert marker.read_text() == "clean-up ran"


@pytest.mark.slow
def test_sigterm_of_the_web_app_removes_its_download_folder(tmp_path, data_home):
    """`kill -TERM <webui pid>` left /tmp/sage_ft_dl_* behind (Ctrl-C removed it). The app runs here with
    its chat manager (in-process backend, so no vLLM start), whose exit handler comes first."""
    port = free_port()
    env = dict(os.environ, SAGE_FT_HOME=str(data_home), TMPDIR=str(tmp_path), SAGE_FT_DISABLE_VLLM="1")
    app = subprocess.Popen([sys.executable, "webui.py", "--port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        up = False
        while not up and time.monotonic() < deadline and app.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                up = httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200
            time.sleep(0.5)
        assert up, f"the app did not come up (exit code {app.poll()})"
        downloads = list(tmp_path.glob("sage_ft_dl_*"))
        assert len(downloads) == 1 and downloads[0].is_dir()
        (downloads[0] / "export.zip").write_bytes(b"x" * 1024)  # something staged for a download
        app.send_signal(signal.SIGTERM)
        app.wait(timeout=120)
    finally:
        if app.poll() is None:
            app.kill()
    assert not list(tmp_path.glob("sage_ft_dl_*")), "the download folder outlived the app"


@pytest.mark.vllm
@pytest.mark.slow
def test_stop_orphans_ends_the_server_a_killed_serve_left(tmp_path, serving_demo_model):
    """kill -9 of `sage-ft serve` leaves its vLLM running without an owner (by design: the next sage-ft
    start adopts it); `sage-ft serve --stop-orphans` ends it, found by its recorded pid + start time."""
    home = tmp_path / "home"
    env = dict(os.environ, SAGE_FT_HOME=str(home))
    serve = subprocess.Popen([sys.executable, "-m", "sage_ft", "serve", "--model", str(serving_demo_model),
                              "--port", str(free_port()), "--max-model-len", "512"], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines = read_until(serve.stdout, "log:", timeout=900)
        assert any(line.startswith("API key:") for line in lines), f"no endpoint (exit code {serve.poll()})"
        serve.kill()  # kill -9: no clean-up at all
        serve.wait(timeout=30)
    finally:
        if serve.poll() is None:
            serve.kill()
    entries = _entries(home)
    assert len(entries) == 1
    pid = entries[0]["pid"]
    assert process_start.is_running(pid, entries[0]["create_time"])  # the orphan runs on
    proc = subprocess.run([sys.executable, "-m", "sage_ft", "serve", "--stop-orphans"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and f"ended the chat server pid {pid}" in proc.stdout, proc.stdout + proc.stderr
    deadline = time.monotonic() + 30
    while group_members(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = group_members(pid)
    for member in left:  # ended, so a failure here leaves nothing running for the next tests
        with contextlib.suppress(psutil.Error):
            member.kill()
    assert left == [] and not process_start.is_running(pid, entries[0]["create_time"])
    assert _entries(home) == []


def _entries(home: Path) -> list[dict]:
    import json

    try:
        return json.loads((home / "serving" / "servers.json").read_text())["servers"]
    except (OSError, ValueError, KeyError):
        return []
