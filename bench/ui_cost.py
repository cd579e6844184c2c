"""UI cost: start-up time and idle memory of ``python webui.py`` vs a bare ``gr.Blocks`` hello page,
idle CPU with no page open, and the CPU cost of the page's live polling with a running (paused) task
and two open browsers. (The effect of monitoring on training speed: ``bench/monitoring.py``.)

    python bench/ui_cost.py [--quick]

Both apps are launched the same way (a child process, first page served = HTTP 200 on ``/``), so
the ratio isolates what sage-ft adds. Polling cost = the app's CPU% with two browsers open minus
with none, while the same training task runs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, bar_chart, print_table, save_results  # noqa: E402

HELLO = ("import gradio as gr, sys\n"
         "with gr.Blocks() as demo:\n    gr.Markdown('hello')\n"
         "demo.launch(server_name='127.0.0.1', server_port=int(sys.argv[1]))\n")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


def tree_rss_mb(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def cpu_percent(pid: int, seconds: float) -> float:
    import psutil

    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return 100 * ((after.user - before.user) + (after.system - before.system)) / seconds


def launch(kind: str, port: int, home: Path) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ, SAGE_FT_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               GRADIO_ANALYTICS_ENABLED="False")
    if kind == "hello":
        cmd = [sys.executable, "-c", HELLO, str(port)]
    else:
        cmd = [sys.executable, str(ROOT / "webui.py"), "--no-llm", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return proc, wait_http(f"http://127.0.0.1:{port}/", proc)


def stop(proc: subprocess.Popen) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def polling_cost(port: int, pid: int, home: Path, seconds: float) -> dict:
    from playwright.sync_api import sync_playwright

    os.environ["SAGE_FT_HOME"] = str(home)
    from sage_ft.tasks import TaskManager

    data = home / "poll.jsonl"
    rows = ({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(64))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = TaskManager(start_worker=False)
    task = tasks.create({"dataset": str(data), "max_steps": 100_000, "cutoff_len": 64, "save_steps": 100_000,
                         "per_device_train_batch_size": 2}, name="polling-bench")
    deadline = time.time() + 300
    while tasks.get(task.id).step < 1 and time.time() < deadline:  # model loaded, training under way
        time.sleep(0.5)
    # Paused between steps: the task stays "running" (the page polls its progress, curves and log)
    # but burns no CPU, so what remains is the UI's own cost.
    tasks.pause(task.id)
    time.sleep(5)
    idle = cpu_percent(pid, seconds)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        pages = [browser.new_page() for _ in range(2)]
        for page in pages:
            page.goto(f"http://127.0.0.1:{port}/")
        time.sleep(5)
        watched = cpu_percent(pid, seconds)
        tasks.cancel(task.id)
        tasks.wait(task.id, timeout=120)
        browser.close()
    tasks.shutdown()
    return {"cpu_percent_no_browser": idle, "cpu_percent_two_browsers": watched,
            "polling_cpu_percent": watched - idle}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    rows = []
    with tempfile.TemporaryDirectory(prefix="sage_ft_uicost_") as tmp:
        home = Path(tmp)
        # the demo model is built once beforehand so neither start-up pays for it
        subprocess.run([sys.executable, "-m", "sage_ft", "demo-model"], env=dict(os.environ, SAGE_FT_HOME=tmp,
                       PYTHONPATH=str(ROOT)), check=True, capture_output=True)
        seconds_measured = 10 if args.quick else 20
        for kind in ("hello", "sage-ft"):
            starts, rss, idle_cpu = [], [], []
            for attempt in range(repeats):
                port = free_port()
                proc, seconds = launch(kind, port, home)
                time.sleep(3)
                starts.append(seconds)
                rss.append(tree_rss_mb(proc.pid))
                idle_cpu.append(cpu_percent(proc.pid, seconds_measured))  # no page open, nothing running
                if kind == "sage-ft" and attempt == repeats - 1:
                    poll = polling_cost(port, proc.pid, home, seconds_measured)
                stop(proc)
            rows.append({"app": kind, "first_page_s": min(starts), "idle_rss_mb": min(rss),
                         "idle_cpu_percent": min(idle_cpu)})
    base = rows[0]
    for r in rows:
        r["start_ratio"] = r["first_page_s"] / base["first_page_s"]
        r["rss_ratio"] = r["idle_rss_mb"] / base["idle_rss_mb"]
    print_table(rows, ["app", "first_page_s", "start_ratio", "idle_rss_mb", "rss_ratio", "idle_cpu_percent"])
    print(f"polling: app CPU {poll['cpu_percent_no_browser']:.1f}% with a running (paused) task and no browser, "
          f"{poll['cpu_percent_two_browsers']:.1f}% with two open pages "
          f"(+{poll['polling_cpu_percent']:.1f} points of one core)")
    path = save_results("ui_cost", {"rows": rows, "polling": poll})
    bar_chart(path.with_suffix(".html"), "Start-up to first page (s)", [r["app"] for r in rows],
              [r["first_page_s"] for r in rows], "seconds")
    print(f"start-up ratio: {rows[1]['start_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
