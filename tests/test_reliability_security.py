"""Attacks that ``test_webui_security.py`` does not already try, through the real HTTP API.

- typed paths in share mode on the Chat and Export tabs (``/etc``, ``~/.ssh``, ``/etc/passwd``) and
  odd spellings of ``/etc/passwd`` as a dataset;
- ``.py`` uploads and YAML files with python tags (``!!python/object/apply``) that must never run;
- the managed vLLM server: every listening socket of its process tree on loopback, every ``/v1`` route
  (chat, runtime LoRA load/unload) refused without the per-start key, the key never shown by the UI;
- the source itself: no shell strings and no unsafe YAML loaders anywhere in ``sage_ft/``.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from sage_ft import paths
from sage_ft.config import ConfigError, TrainConfig
from sage_ft.webui.auth import LoginGuard
from tests.fixtures_webui import start_webui

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "sage_ft"
USER, PASSWORD = "mallory-tester", "a long enough password"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """An exposed app (paths confined, login required) whose chat server choice is 'none' (never starts)."""
    from sage_ft.serving import ServerManager

    guard = LoginGuard.from_pairs([(USER, PASSWORD)], base_delay_s=0.01, max_delay_s=0.05)
    app = start_webui(tmp_path_factory.mktemp("attacker"), start_worker=False, exposed=True, guard=guard,
                      max_upload_bytes=64 * 1024,
                      server=ServerManager(backend="none", install_exit_handlers=False, adopt=False))
    yield app
    app.services.server.close()
    app.close()


@pytest.fixture(scope="module")
def client(shared):
    return shared.client(auth=(USER, PASSWORD))


# ------------------------------------------------------------------------------ confined paths
@pytest.mark.parametrize("model", ["/etc", "~/.ssh", "/etc/passwd", "/root", "../../../../etc"])
def test_chat_switch_refuses_system_folders_as_models(shared, client, model):
    status, *_ = client.predict(model, "en", api_name="/chat_switch")
    assert status.startswith("❌") and "outside the folders this shared app may use" in status, status
    assert shared.services.server.status()["model_label"] is None  # nothing was chosen, nothing started


@pytest.mark.parametrize("source", ["/etc", os.path.expanduser("~/.ssh"), "/etc/passwd"])
def test_export_refuses_system_folders_as_sources(client, source):
    progress, result, _ = client.predict(source, "bfloat16", "2GB", "stolen", False, False, "none", False, "en",
                                         api_name="/export_start")
    assert result.startswith("❌") and "outside the folders" in result, result
    assert not (paths.exports_dir() / "stolen").exists()


@pytest.mark.parametrize("spelling", ["/etc/./passwd", "//etc//passwd", "/tmp/../etc/passwd", "~/../../etc/passwd",
                                      "file:///etc/passwd", "/etc/passwd\x00.jsonl"])
def test_odd_spellings_of_etc_passwd_never_read_it(client, spelling):
    report, histogram, preview = client.predict("en", spelling, "auto", "", None, "demo", "auto", 64,
                                                api_name="/check_dataset")
    assert "root:" not in report + preview and histogram is None
    assert report.startswith("❌") or "cannot be used" in report, report


# ------------------------------------------------------------------------------ uploads
def test_python_files_are_refused_as_uploads(client, tmp_path):
    payload = tmp_path / "payload.py"
    payload.write_text("import os; os.system('touch /tmp/sage_ft_pwned')\n")
    for route in ("/upload_dataset", "/upload_config"):
        with pytest.raises(AppError, match="Invalid file type"):
            client.predict(handle_file(str(payload)), "en", api_name=route)
    disguised = tmp_path / "payload.py.jsonl"  # a double extension is just a (bad) dataset, never code
    disguised.write_text(payload.read_text())
    stored, _, _ = client.predict(handle_file(str(disguised)), "en", api_name="/upload_dataset")
    assert Path(stored).suffix == ".jsonl" and Path(stored).parent.parent == paths.datasets_dir() / "uploads"
    report, _, _ = client.predict("en", stored, "auto", "", None, "demo", "auto", 64, api_name="/check_dataset")
    assert "invalid JSON" in report
    assert not Path("/tmp/sage_ft_pwned").exists()


def test_oversize_config_upload_is_refused_and_not_stored(client, tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 10_000 + "lora_rank: 8\n")  # ~100 KiB > the 64 KiB limit
    uploads = paths.home() / "configs" / "uploads"
    before = set(uploads.glob("*")) if uploads.exists() else set()
    with pytest.raises(Exception) as err:  # noqa: B017 - refused by the server at upload time
        client.predict(handle_file(str(big)), "en", api_name="/upload_config")
    assert "413" in str(err.value) or "size" in str(err.value).lower() or "large" in str(err.value).lower()
    assert (set(uploads.glob("*")) if uploads.exists() else set()) == before


EVIL_YAML = """\
model_name_or_path: demo
lora_rank: !!python/object/apply:os.system ["touch {marker}"]
run_name: !!python/object/new:subprocess.check_output [["touch", "{marker}"]]
"""


def test_yaml_with_python_tags_never_runs(client, tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.yaml"
    evil.write_text(EVIL_YAML.format(marker=marker))
    *values, message, _ = client.predict(handle_file(str(evil)), "en", api_name="/upload_config")
    assert "invalid YAML" in message and "line 2" in message and not marker.exists()
    with pytest.raises(ConfigError, match=r"evil.yaml: line 2, column \d+ invalid YAML"):
        TrainConfig.from_yaml(evil)
    out = subprocess.run([sys.executable, "-m", "sage_ft", "train", str(evil)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "invalid YAML" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------ the source itself
def _sources() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in sorted(SOURCE.rglob("*.py"))]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def test_no_shell_strings_are_built_anywhere():
    """No ``shell=True``, ``os.system``/``os.popen``/``os.exec*`` with strings, or a subprocess given one string."""
    found = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            where = f"{path.relative_to(ROOT)}:{node.lineno} {name}"
            if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                   for k in node.keywords):
                found.append(where + " shell=")
            if name in ("os.system", "os.popen", "commands.getoutput", "subprocess.getoutput",
                        "subprocess.getstatusoutput", "pty.spawn"):
                found.append(where)
            if name.startswith("subprocess.") and node.args and isinstance(node.args[0], (ast.JoinedStr, ast.BinOp)):
                found.append(where + " (a command built as one string)")
    assert found == []


def test_yaml_is_only_read_with_safe_loaders():
    found = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in ("yaml.load", "yaml.load_all", "yaml.unsafe_load",
                                                                    "yaml.full_load", "yaml.unsafe_load_all"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Attribute) and _dotted(node) in ("yaml.Loader", "yaml.UnsafeLoader",
                                                                     "yaml.FullLoader"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
    assert any("yaml.safe_load" in p.read_text() for p in SOURCE.rglob("*.py"))  # the check looks at real code


# ------------------------------------------------------------------------------ the managed vLLM server
def _tree(pid: int):
    import psutil

    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


@pytest.mark.vllm
@pytest.mark.slow
def test_every_socket_of_the_vllm_tree_listens_on_loopback_only(vllm_manager):
    import psutil

    listening = []
    for proc in _tree(vllm_manager.server.pid):
        try:
            listening += [(proc.pid, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    assert listening, "the server listens somewhere"
    assert all(ip in ("127.0.0.1", "::1") for _, ip, _ in listening), listening


@pytest.mark.vllm
@pytest.mark.slow
def test_every_v1_route_needs_the_key(vllm_manager, serving_adapters):
    import httpx

    server = vllm_manager.server
    chat = {"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    attempts = [("GET", "/models", None), ("POST", "/chat/completions", chat),
                ("POST", "/completions", {"model": "demo", "prompt": "hi", "max_tokens": 2}),
                ("POST", "/load_lora_adapter", {"lora_name": "evil", "lora_path": str(serving_adapters["a"])}),
                ("POST", "/unload_lora_adapter", {"lora_name": "demo"})]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {server.api_key}x"}):
        for method, route, body in attempts:
            response = httpx.request(method, server.base_url + route, json=body, headers=headers, timeout=10)
            assert response.status_code == 401, (route, headers, response.status_code)
    names = [m["id"] for m in server.served_models()]
    assert "evil" not in names  # the refused load did not happen
    ok = httpx.post(server.base_url + "/chat/completions", json=chat, timeout=60,
                    headers={"Authorization": f"Bearer {server.api_key}"})
    assert ok.status_code == 200  # the same request with the key works: the refusals above were about the key
    assert len(server.api_key) >= 24


@pytest.mark.vllm
@pytest.mark.slow
def test_the_ui_never_shows_the_api_key(vllm_manager, tmp_path):
    app = start_webui(tmp_path / "app", start_worker=False, server=vllm_manager)
    try:
        client = app.client()
        key = vllm_manager.server.api_key
        shown = [client.predict("en", api_name="/server_status"), client.predict("en", None, None, api_name="/chat_models")]
        assert key not in str(shown) and "ready" in str(shown[0])
    finally:
        app.close()
    registry = paths.home() / "servers.json"
    for entry_file in [registry, *paths.home().glob("**/servers*.json")]:
        if entry_file.exists():
            assert oct(entry_file.stat().st_mode & 0o777) == oct(0o600), entry_file


@pytest.mark.vllm
@pytest.mark.slow
def test_the_api_key_is_not_on_the_command_line(vllm_manager):
    key = vllm_manager.server.api_key
    exposed = [p.pid for p in _tree(vllm_manager.server.pid) if key in " ".join(p.cmdline())]
    assert exposed == []


def test_login_is_required_before_any_of_the_above(shared):
    import requests

    assert requests.get(shared.url.rstrip("/") + "/gradio_api/info", timeout=10).status_code == 401
    with pytest.raises(Exception):  # noqa: B017 - the client refuses to connect without a login
        shared.client()
