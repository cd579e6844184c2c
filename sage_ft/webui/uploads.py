"""Files that come from the browser, and paths the user types, when the app may be exposed.

Uploads: only known extensions, bounded size, copied under the data home with generated names
(the user's file name never becomes a path). Typed paths: in share mode every path a user types
(dataset files, a local model, an output or checkpoint directory, a config file) must resolve —
symlinks followed — inside the allowed roots, so nobody reads ``/etc/passwd`` as a "dataset" or
serves ``~/.ssh`` as a "model".
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sage_ft import paths
from sage_ft.config import TrainConfig
from sage_ft.data.load import SUFFIXES

KINDS = {"dataset": SUFFIXES, "config": (".yaml", ".yml")}
MAX_UPLOAD_BYTES = int(os.environ.get("SAGE_FT_MAX_UPLOAD_BYTES") or 200 * 1024**2)


class UploadError(ValueError):
    """An upload that is refused; the message names the file and what is allowed."""


class PathRefused(ValueError):
    """A typed path outside the allowed roots (share mode)."""


def upload_dir(kind: str) -> Path:
    base = paths.datasets_dir() if kind == "dataset" else paths.home() / "configs"
    path = base / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def store_upload(src: str | Path, kind: str, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Check and copy an uploaded temp file into the data home; returns the stored path."""
    if kind not in KINDS:
        raise ValueError(f"unknown upload kind {kind!r}")
    src = Path(src)
    name = src.name
    suffix = src.suffix.lower()
    if suffix not in KINDS[kind]:
        raise UploadError(f"{name}: a {kind} upload must be one of {', '.join(KINDS[kind])}, "
                          f"not {suffix or 'a file without extension'}")
    if not src.is_file():
        raise UploadError(f"{name}: the upload did not arrive; try again")
    size = src.stat().st_size
    if size > max_bytes:
        raise UploadError(f"{name}: {size / 1024**2:.1f} MiB is over the {max_bytes / 1024**2:.0f} MiB upload limit; "
                          "put the file in the data home and pick it from the list instead")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", src.stem).strip("-")[:40] or kind
    # A folder per upload keeps the file's own name, so task names, lists and reports show "alpaca",
    # not "20261125-101224-4c0940b9-alpaca"; uploads of the same name never meet.
    folder = upload_dir(kind) / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    stored = folder / f"{stem}{suffix}"
    shutil.copyfile(src, stored)
    return stored


@dataclass
class PathGuard:
    """``roots=None``: the app runs for its owner only and any path is allowed."""

    roots: list[Path] | None = None
    known_names: set[str] = field(default_factory=lambda: {"demo"})

    @classmethod
    def for_share(cls, extra: list[Path] | None = None) -> PathGuard:
        roots = [paths.home(), paths.project_root() / "configs", *(extra or [])]
        return cls(roots=[Path(os.path.realpath(r)) for r in roots])

    @property
    def confined(self) -> bool:
        return self.roots is not None

    def looks_like_path(self, value: str) -> bool:
        text = value.strip()
        return (text.startswith(("/", "~", ".", "\\")) or ".." in text or "\\" in text
                or os.path.exists(os.path.expanduser(text)))

    def check(self, value: str, what: str) -> str:
        """Return ``value`` unchanged when allowed; raise ``PathRefused`` naming the field when not."""
        if not self.confined or not value.strip() or value.strip() in self.known_names:
            return value
        if not self.looks_like_path(value):
            return value  # a name such as a Hugging Face id, resolved by the core, not a file path
        real = Path(os.path.realpath(os.path.expanduser(value.strip())))
        if any(real == root or root in real.parents for root in self.roots or []):
            return value
        raise PathRefused(f"{what}: {value!r} is outside the folders this shared app may use "
                          f"(the data home {paths.home()} and the configs folder); upload the file instead")

    def check_config(self, config: TrainConfig) -> list[str]:
        """Problems with every path-valued field of a config (empty list = allowed)."""
        problems = []
        items = [("model_name_or_path", config.model_name_or_path), ("output_dir", config.output_dir),
                 ("resume_from_checkpoint", config.resume_from_checkpoint or "")]
        items += [("dataset", d) for d in config.datasets] + [("eval_dataset", d) for d in config.eval_datasets]
        for name, value in items:
            if name == "resume_from_checkpoint" and value == "last":
                continue
            try:
                self.check(value, name)
            except PathRefused as exc:
                problems.append(str(exc))
        return problems
