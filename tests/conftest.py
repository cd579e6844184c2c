"""Test session set-up: an isolated data home and a free chat-server port for the whole session.

Area-specific fixtures live in ``tests/fixtures_<area>.py`` (one owner each) and are loaded as
plugins here, so the shared set-up has one home and no two areas edit the same file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Must happen before any sage_ft module reads its paths.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="sage_ft_test_home_"))
os.environ["SAGE_FT_HOME"] = str(_SESSION_HOME)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures_core",
    "tests.fixtures_data",
    "tests.fixtures_training",
    "tests.fixtures_tasks",
    "tests.fixtures_serving",
    "tests.fixtures_webui",
]
