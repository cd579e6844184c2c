"""Can the Trainer resume from this ``checkpoint-N`` folder? Checked cheaply, before a resume queues.

A checkpoint is published by one rename once every file is written (``training.engine``), but a
folder can still be damaged afterwards: a disk error, a copy cut short, a file edited by hand.
Resuming from one failed deep inside a library (``SafetensorError: Error while deserializing header:
invalid header length``, no file named), and every later resume picked the same folder again.

So look at what ``transformers.Trainer`` loads on resume - ``trainer_state.json``, the adapter
(``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``), ``optimizer.pt``,
``scheduler.pt``, ``rng_state*.pth`` (and ``scaler.pt`` when there is one) - without reading any
weights: each JSON file parses, the safetensors header is readable and the file is exactly as long
as the header says, and each torch file is a complete zip archive (torch.save writes one; its
directory sits at the very end, so a file cut short has none). The Trainer skips a missing
optimizer or scheduler silently (the run would continue with a fresh optimizer), so a missing one
counts as damage too.
"""

from __future__ import annotations

import json
import struct
import threading
import zipfile
from pathlib import Path

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_REQUIRED_TORCH_FILES = ("optimizer.pt", "scheduler.pt")
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit


def checkpoint_problem(path: str | Path) -> str | None:
    """What makes ``path`` unusable for a resume ("adapter_model.safetensors is cut short: ..."), or
    None when it looks complete. Cached on the files' sizes and modification times, so asking again
    (the Monitor asks every few seconds) costs a few ``stat`` calls."""
    folder = Path(path)
    try:
        files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    key = (str(folder), tuple(files))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    problem = _first_problem(folder, {name: size for name, size, _ in files})
    with _CACHE_LOCK:
        if len(_CACHE) > 512:
            _CACHE.clear()
        _CACHE[key] = problem
    return problem


_CACHE: dict[tuple[str, tuple[tuple[str, int, int], ...]], str | None] = {}
_CACHE_LOCK = threading.Lock()


def _first_problem(folder: Path, sizes: dict[str, int]) -> str | None:
    problem = _json_problem(folder / "trainer_state.json", require="global_step")
    if problem:
        return problem
    weights = next((name for name in ADAPTER_WEIGHTS if name in sizes), None)
    if weights is None:
        return f"{ADAPTER_WEIGHTS[0]} is missing (the adapter weights)"
    problem = _json_problem(folder / "adapter_config.json") or (
        _safetensors_problem(folder / weights, sizes[weights]) if weights.endswith(".safetensors")
        else _torch_file_problem(folder / weights))
    if problem:
        return problem
    rng_files = sorted(name for name in sizes if name.startswith("rng_state") and name.endswith(".pth"))
    if not rng_files:
        return "rng_state.pth is missing (the random state the Trainer restores)"
    scaler = ["scaler.pt"] if "scaler.pt" in sizes else []
    for name in (*_REQUIRED_TORCH_FILES, *rng_files, *scaler):
        problem = _torch_file_problem(folder / name) if name in sizes else f"{name} is missing"
        if problem:
            return problem
    return None


def _json_problem(path: Path, require: str | None = None) -> str | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        return f"{path.name} is not valid JSON ({exc})"
    if require and not (isinstance(data, dict) and isinstance(data.get(require), int)):
        return f"{path.name} has no {require}"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """The 8-byte header length, the JSON header, and a file exactly as long as its tensors."""
    try:
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path.name} is cut short ({size} bytes, not even a header)"
            (length,) = struct.unpack("<Q", head)
            if length > _MAX_SAFETENSORS_HEADER or 8 + length > size:
                return f"{path.name} is cut short or corrupt ({size:,} bytes; its header claims {length:,})"
            header = json.loads(fh.read(length))
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    except ValueError:
        return f"{path.name} is corrupt (its header is not readable)"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return f"{path.name} is corrupt (its header lists no valid tensor offsets)"
    expected = 8 + length + end
    if size != expected:
        return f"{path.name} is {'cut short' if size < expected else 'corrupt'} ({size:,} bytes; its header " \
               f"says {expected:,})"
    return None


def _torch_file_problem(path: Path) -> str | None:
    """A torch.save file is a zip archive whose directory is at the end: a file cut short has none."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    except zipfile.BadZipFile:
        return f"{path.name} is cut short or corrupt (not a complete torch file)"
    if not any(name.endswith("data.pkl") for name in names):
        return f"{path.name} is corrupt (not a torch file)"
    return None
