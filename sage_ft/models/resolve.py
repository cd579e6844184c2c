"""Turn what the user typed as ``model_name_or_path`` into a local model directory.

Three spellings are accepted, checked in this order so that a local folder always wins over a hub
id of the same name:

- ``demo``: the built-in tiny model, built on first use (offline, seconds);
- an existing local directory: it must hold ``config.json``, weights and a tokenizer — a folder
  missing any of them is refused up front with what is missing, instead of failing deep inside
  ``from_pretrained`` minutes into a run;
- a Hugging Face hub id (``Qwen/Qwen2.5-0.5B-Instruct``): the local HF cache first (works offline),
  else a real download (the path users on a networked GPU box take); offline, the error says how to
  get the model onto the machine.
"""

from __future__ import annotations

import re
from pathlib import Path

from sage_ft import paths

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin", "*.pt", "consolidated*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # a Hugging Face Hub repo id: org/name
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py", "*.jinja"]


class ModelError(ValueError):
    """A model that cannot be used: names the path or id, what is missing and what to do."""


def resolve_model(name_or_path: str) -> Path:
    """The local directory of ``name_or_path`` (see the module docstring); raises ``ModelError``."""
    name = str(name_or_path or "").strip()
    if not name:
        raise ModelError("no model given; use 'demo', a local model directory or a Hugging Face id")
    if name == "demo":
        from sage_ft.models.demo import ensure_demo_model

        return ensure_demo_model()
    path = Path(name).expanduser()
    if path.exists():
        return check_model_dir(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not HUB_ID.match(name):
        raise ModelError(f"model directory {path} does not exist; give an existing directory with config.json, "
                         "weights and a tokenizer, a Hugging Face id like Qwen/Qwen2.5-0.5B-Instruct, or 'demo'")
    return _from_hub(name)


def missing_parts(path: Path) -> list[str]:
    """What a model directory lacks among config.json, weights and tokenizer files (empty = usable)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json / tokenizer.model / tokenizer_config.json)")
    return missing


def check_model_dir(path: Path) -> Path:
    """``path`` itself when it is a usable model directory, else ``ModelError`` naming what is missing."""
    path = path.resolve()
    if not path.is_dir():
        raise ModelError(f"{path} is a file, not a model directory; give the folder that holds config.json")
    missing = missing_parts(path)
    if missing:
        hint = ("it looks like a LoRA adapter folder; give its base model instead"
                if (path / "adapter_config.json").exists()
                else "copy the complete model folder (as saved by save_pretrained or downloaded from the hub)")
        raise ModelError(f"model directory {path} is missing {', '.join(missing)}; {hint}")
    return path


def _from_hub(repo_id: str) -> Path:
    """The HF cache snapshot of ``repo_id``; download it when not cached (needs network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        raise ModelError("huggingface_hub is not installed; install transformers' dependencies") from None
    try:
        return check_model_dir(Path(snapshot_download(repo_id, local_files_only=True, cache_dir=paths.hf_hub_cache())))
    except ModelError:
        raise
    except Exception:  # not in the cache (LocalEntryNotFoundError and friends): try the network
        pass
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=_DOWNLOAD_PATTERNS, cache_dir=paths.hf_hub_cache()))
    except Exception as exc:
        kind = type(exc).__name__
        if "Offline" in kind or "Connect" in kind or "LocalEntryNotFound" in kind or "offline" in str(exc).lower():
            # worded for every place a model is asked for (a train config, the Chat tab's picker, the CLI)
            raise ModelError(
                f"model {repo_id!r} is not in the Hugging Face cache and cannot be downloaded (this machine cannot "
                f"reach the hub). On a machine with network run `huggingface-cli download {repo_id}` and copy "
                "the folder here, then give that folder as the model") from None
        if "RepositoryNotFound" in kind or "404" in str(exc):
            raise ModelError(f"model {repo_id!r} was not found on the Hugging Face hub; check the spelling "
                             "(or log in with `huggingface-cli login` for a gated/private model)") from None
        raise ModelError(f"could not download model {repo_id!r}: {kind}: {exc}") from None
    return check_model_dir(path)
