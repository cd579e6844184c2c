"""Where sage-ft keeps its data: one home directory, ``SAGE_FT_HOME`` (default ``~/.sage_ft``).

Every other module asks this one for a location so that a test (or a user) can move the whole
state by setting one environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_LLM_PORT = 8001


class DataHomeUnavailable(RuntimeError):
    """The data home (or a folder in it) cannot be created: not writable, a file in the way, disk
    full. The message names the folder, the reason and what to do; the CLI and the launcher print it
    as it is, with no traceback."""


def home() -> Path:
    """The data home, created on first use."""
    path = Path(os.environ.get("SAGE_FT_HOME") or Path.home() / ".sage_ft").expanduser()
    make_folder(path)
    return path


def _sub(name: str) -> Path:
    path = home() / name
    make_folder(path)
    return path


def make_folder(path: Path) -> None:
    """``mkdir -p`` that says which folder could not be made, and why, as ``DataHomeUnavailable``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataHomeUnavailable(f"cannot create the data folder {path}: {exc.strerror or exc} "
                                  f"({exc.filename or path}); set SAGE_FT_HOME to a writable folder") from None


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


def hf_hub_cache() -> Path:
    """The Hugging Face cache of Hub models and datasets, read at call time (``huggingface_hub``
    reads ``HF_HUB_CACHE`` / ``HF_HOME`` once, when it is first imported)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    hf_home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(hf_home).expanduser() / "hub"


def project_root() -> Path:
    """The source checkout (for the shipped docs used as the built-in sample dataset)."""
    return Path(__file__).resolve().parent.parent
