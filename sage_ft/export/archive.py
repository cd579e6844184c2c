"""One-file download of an export directory.

Weights (safetensors, GGUF) are stored uncompressed — they do not compress and deflating gigabytes
would only burn CPU — while text files are deflated. The zip is written to a temporary name and
renamed, so a download link never points at half an archive.
"""

from __future__ import annotations

import os
import tempfile
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path

from sage_ft.export.source import ExportCancelled, ExportError

_STORED_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt"}


_CHUNK_BYTES = 16 * 2**20  # cancel is checked between chunks, so one big weights file does not delay it


def zip_export(directory: str | Path, out_file: str | Path | None = None,
               cancel_event: threading.Event | None = None,
               progress: Callable[[str, float], None] | None = None) -> Path:
    """Zip ``directory`` (entries under ``<dir name>/``) to ``out_file`` (default ``<dir>.zip`` beside it).

    ``progress("zip", fraction of bytes)``; ``cancel_event`` is checked between files and between
    16 MiB chunks of a file: a cancelled zip raises ``ExportCancelled`` and leaves no file behind (an
    existing ``out_file`` stays as it was).
    """
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise ExportError(f"cannot zip {directory}: it is not a directory")
    out = Path(out_file).expanduser().resolve() if out_file else directory.with_name(directory.name + ".zip")
    if out.is_relative_to(directory):
        raise ExportError(f"the zip {out} must not be inside the directory it archives ({directory})")
    files = [p for p in sorted(directory.rglob("*"))
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)]
    total = sum(p.stat().st_size for p in files) or 1
    done = 0

    def step() -> None:
        if cancel_event is not None and cancel_event.is_set():
            raise ExportCancelled(f"zip cancelled; no zip file was written ({out.name})")
        if progress is not None:
            progress("zip", done / total)

    step()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
            for path in files:
                info = zipfile.ZipInfo.from_file(path, str(Path(directory.name) / path.relative_to(directory)))
                info.compress_type = zipfile.ZIP_STORED if path.suffix in _STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                with path.open("rb") as src, archive.open(info, "w", force_zip64=True) as dst:
                    while chunk := src.read(_CHUNK_BYTES):
                        step()
                        dst.write(chunk)
                        done += len(chunk)
                step()
        tmp.chmod(0o644)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    if progress is not None:
        progress("zip", 1.0)
    return out
