"""One-file download of an export directory.

Weights (safetensors, GGUF) are stored uncompressed — they do not compress and deflating gigabytes
would only burn CPU — while text files are deflated. The zip is written to a temporary name and
renamed, so a download link never points at half an archive.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

from sage_ft.export.source import ExportError

_STORED_SUFFIXES = {".safetensors", ".gguf", ".bin", ".pt"}


def zip_export(directory: str | Path, out_file: str | Path | None = None) -> Path:
    """Zip ``directory`` (entries under ``<dir name>/``) to ``out_file`` (default ``<dir>.zip`` beside it)."""
    directory = Path(directory).expanduser().resolve()
    if not directory.is_dir():
        raise ExportError(f"cannot zip {directory}: it is not a directory")
    out = Path(out_file).expanduser().resolve() if out_file else directory.with_name(directory.name + ".zip")
    if out.is_relative_to(directory):
        raise ExportError(f"the zip {out} must not be inside the directory it archives ({directory})")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
            for path in sorted(directory.rglob("*")):
                if not path.is_file() or any(part.startswith(".") for part in path.relative_to(directory).parts):
                    continue
                method = zipfile.ZIP_STORED if path.suffix in _STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                archive.write(path, Path(directory.name) / path.relative_to(directory), compress_type=method)
        tmp.chmod(0o644)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
