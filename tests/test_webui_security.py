"""The app as an attacker sees it: a shared (exposed) app over real HTTP.

Login required and failures slowed down; typed paths outside the data home refused (files,
symlinks, models, configs, output folders); uploads with a wrong extension or over the size limit
refused; ``--share`` without credentials generates a password; offline, the share link failure is
reported and the app keeps serving locally (a real ``webui.py`` process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import requests
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from sage_ft import paths
from sage_ft.webui.auth import AuthError, LoginGuard, parse_pair, read_auth_file
from sage_ft.webui.launch import login_guard
from sage_ft.webui.uploads import UploadError, store_upload
from tests.fixtures_data import memorize_rows, write_jsonl
from tests.fixtures_webui import form_args, free_port, start_webui, stop_app_process

USER, PASSWORD = "alice", "correct horse battery"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    guard = LoginGuard.from_pairs([(USER, PASSWORD)], base_delay_s=0.05, max_delay_s=0.2)
    app = start_webui(tmp_path_factory.mktemp("shared"), start_worker=False, exposed=True, guard=guard,
                      max_upload_bytes=64 * 1024)
    yield app, guard
    app.close()


@pytest.fixture(scope="module")
def client(shared):
    app, _ = shared
    return app.client(auth=(USER, PASSWORD))


def test_nothing_is_reachable_without_login(shared):
    app, _ = shared
    base = app.url.rstrip("/")
    for route in ("/config", "/gradio_api/info"):
        assert requests.get(base + route, timeout=10).status_code == 401, route
    joined = requests.post(base + "/gradio_api/queue/join", timeout=10,
                           json={"data": ["zh"], "fn_index": 0, "session_hash": "x", "event_data": None})
    assert joined.status_code == 401
    with pytest.raises(Exception):  # noqa: B017 - the client refuses to connect without a login
        app.client()


def test_wrong_passwords_are_refused_and_slowed_down(shared):
    app, guard = shared
    before = guard.total_failures
    for attempt in range(3):
        response = requests.post(app.url.rstrip("/") + "/login", data={"username": USER, "password": f"guess{attempt}"},
                                 timeout=30)
        assert response.status_code == 400
        assert "access-token" not in response.headers.get("set-cookie", "")
    assert guard.total_failures == before + 3
    assert guard.next_delay() > guard.base_delay_s  # the next failure waits longer
    ok = requests.post(app.url.rstrip("/") + "/login", data={"username": USER, "password": PASSWORD}, timeout=30)
    assert ok.status_code == 200 and guard.failures == 0
    assert requests.post(app.url.rstrip("/") + "/login", data={"username": "mallory", "password": PASSWORD},
                         timeout=30).status_code == 400


def test_typed_paths_outside_the_data_home_are_refused(client, tmp_path):
    outside = "/etc/passwd"
    report, histogram, preview = client.predict("en", outside, "auto", "", None, "demo", "auto", 64,
                                                api_name="/check_dataset")
    assert "outside the folders" in report and "root:" not in report + preview and histogram is None
    link = paths.datasets_dir() / "innocent.jsonl"
    link.unlink(missing_ok=True)
    link.symlink_to(outside)
    try:
        report, _, preview = client.predict("en", str(link), "auto", "", None, "demo", "auto", 64,
                                            api_name="/check_dataset")
        assert "outside the folders" in report and "root:" not in preview
    finally:
        link.unlink()
    with pytest.raises(AppError, match="not in the list of choices"):  # only listed configs can be named
        client.predict(outside, "en", api_name="/load_config")
    _, message = client.predict(os.path.expanduser("~/.ssh"), "en", api_name="/add_model")
    assert "outside the folders" in message
    inside = write_jsonl(memorize_rows(), paths.datasets_dir() / "ok-for-share.jsonl")
    for field, value in (("dataset", "/etc/hosts"), ("eval_dataset", "/etc"), ("output_dir", str(tmp_path / "elsewhere")),
                         ("model_name_or_path", "/etc"), ("resume_from_checkpoint", "/root")):
        overrides = {"dataset": str(inside), field: value}
        task_id, message, _ = client.predict("en", *form_args(**overrides), api_name="/start")
        assert not isinstance(task_id, int) and f"{field}: " in message and "outside the folders" in message


def test_uploads_with_a_wrong_type_or_size_are_refused(client, tmp_path):
    script = tmp_path / "payload.sh"
    script.write_text("#!/bin/sh\necho pwned\n")
    renamed_yaml = tmp_path / "config.yaml"
    renamed_yaml.write_text("lora_rank: 8\n")
    for wrong in (script, renamed_yaml):
        with pytest.raises(AppError, match="Invalid file type"):
            client.predict(handle_file(str(wrong)), "en", api_name="/upload_dataset")
    with pytest.raises(UploadError, match=r"must be one of \.json, \.jsonl, \.csv, \.tsv, \.parquet, not \.sh"):  # the handler's own check behind it
        store_upload(script, "dataset")
    with pytest.raises(UploadError, match="over the 0 MiB upload limit"):
        store_upload(write_jsonl(memorize_rows(), tmp_path / "ok.jsonl"), "dataset", max_bytes=10)
    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"messages": []}\n' * 8000)  # ~136 KiB > the 64 KiB limit
    before = set((paths.datasets_dir() / "uploads").glob("*")) if (paths.datasets_dir() / "uploads").exists() else set()
    with pytest.raises(Exception) as err:  # noqa: B017 - refused by the server at upload time
        client.predict(handle_file(str(big)), "en", api_name="/upload_dataset")
    assert "413" in str(err.value) or "too large" in str(err.value).lower() or "size" in str(err.value).lower()
    after = set((paths.datasets_dir() / "uploads").glob("*")) if (paths.datasets_dir() / "uploads").exists() else set()
    assert after == before


def test_stored_uploads_get_generated_names(client, tmp_path):
    evil = tmp_path / "..;rm -rf ~;.jsonl"
    write_jsonl(memorize_rows(), evil)
    stored, _, _ = client.predict(handle_file(str(evil)), "en", api_name="/upload_dataset")
    stored = Path(stored)
    assert stored.parent.parent == paths.datasets_dir() / "uploads"
    assert all(c.isalnum() or c in "-_." for c in stored.name) and ";" not in stored.name


def test_auth_flags():
    assert parse_pair("bob:pa:ss") == ("bob", "pa:ss")
    with pytest.raises(AuthError, match="expected user:password"):
        parse_pair("nopassword")


def test_auth_file(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("# team\nann:one\n\nbo:two\n")
    assert read_auth_file(path) == [("ann", "one"), ("bo", "two")]
    path.write_text("ann\n")
    with pytest.raises(AuthError, match="line 1"):
        read_auth_file(path)


def test_share_without_credentials_generates_a_password(capsys):
    guard = login_guard(Namespace(auth=None, auth_file=None), exposed=True)
    out = capsys.readouterr().out
    password = out.split("password: ")[1].split()[0]
    assert len(password) >= 12 and guard.verify("admin", password) and not guard.verify("admin", "admin")
    assert login_guard(Namespace(auth=None, auth_file=None), exposed=False) is None


def test_offline_share_keeps_serving_locally_with_a_login(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "webui.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "webui.py", "--share", "--no-llm", "--port", str(port),
                                 "--auth", f"{USER}:{PASSWORD}", "--data-home", str(tmp_path / "home")],
                                cwd=paths.project_root(), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "Could not create a public share link" not in log_path.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()
            time.sleep(0.5)
        text = log_path.read_text()
        assert "Could not create a public share link" in text and f"127.0.0.1:{port}" in text
        base = f"http://127.0.0.1:{port}"
        assert requests.get(base + "/config", timeout=10).status_code == 401
        session = requests.Session()
        assert session.post(base + "/login", data={"username": USER, "password": PASSWORD}, timeout=30).ok
        assert session.get(base + "/config", timeout=10).status_code == 200
        assert (tmp_path / "home" / "sage_ft.db").exists()  # --data-home took effect
    finally:
        stop_app_process(proc)
