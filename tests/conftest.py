"""Test session set-up: an isolated data home and a block of loopback ports for the whole session.

Area-specific fixtures live in ``tests/fixtures_<area>.py`` (one owner each) and are loaded as
plugins here, so the shared set-up has one home and no two areas edit the same file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Must happen before any sage_ft module reads its paths.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="sage_ft_test_home_"))
os.environ["SAGE_FT_HOME"] = str(_SESSION_HOME)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# When the suite runs on pytest-xdist workers (gw0, gw1, ...; docs/architecture.md), each gets its own block of
# 2,500 loopback ports, its chat servers' default port first (``fixtures_serving.free_port`` picks from
# the rest), so two workers never pick the same free port before either binds it, and no test
# touches the user's own 8001.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
os.environ["SAGE_FT_LLM_PORT"] = str(18000 + 2500 * _WORKER)

pytest_plugins = [
    "tests.fixtures_core",
    "tests.fixtures_data",
    "tests.fixtures_training",
    "tests.fixtures_tasks",
    "tests.fixtures_serving",
    "tests.fixtures_webui",
    "tests.fixtures_browser",
]


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which names each test's group from these marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``--dist loadgroup``) every test of the session's shared vLLM server runs on
    one worker, so a run still starts that server once, and every other test file runs whole on one
    worker, in its order: some tests go on from the state a module fixture was left in by the test
    before them (split over two workers, a test found its server on the base, not on the merged model
    the test before had switched to)."""
    for item in items:
        shared = "vllm_manager" in getattr(item, "fixturenames", ())
        item.add_marker(pytest.mark.xdist_group("shared_vllm_server" if shared else item.nodeid.split("::")[0]))
