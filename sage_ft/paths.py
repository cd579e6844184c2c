"""Where sage-ft keeps its data: one home directory, ``SAGE_FT_HOME`` (default ``~/.sage_ft``).

Every other module asks this one for a location so that a test (or a user) can move the whole
state by setting one environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LLM_PORT = 8001


def home() -> Path:
    """The data home, created on first use."""
    path = Path(os.environ.get("SAGE_FT_HOME") or Path.home() / ".sage_ft").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sub(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Base models that sage-ft built or imported (the demo model lives here)."""
    return _sub("models")


def demo_model_dir() -> Path:
    """The built-in tiny Llama model used by the demo and by the tests."""
    return models_dir() / "demo-tiny-llama"


def runs_dir() -> Path:
    """One sub-directory per fine-tuning run (adapter, checkpoints, events, logs)."""
    return _sub("runs")


def datasets_dir() -> Path:
    """Uploaded and generated datasets, stored under generated names."""
    return _sub("datasets")


def exports_dir() -> Path:
    """Merged / GGUF exports."""
    return _sub("exports")


def logs_dir() -> Path:
    """Logs of the app and of the managed vLLM server."""
    return _sub("logs")


def database_path() -> Path:
    """The SQLite file that holds the task store."""
    return home() / "sage_ft.db"


def llm_port() -> int:
    """Preferred port of the managed chat server (``SAGE_FT_LLM_PORT``)."""
    return int(os.environ.get("SAGE_FT_LLM_PORT") or DEFAULT_LLM_PORT)


def project_root() -> Path:
    """The source checkout (for the shipped docs used as the built-in sample dataset)."""
    return Path(__file__).resolve().parent.parent
