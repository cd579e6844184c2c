"""Which files a ``dataset:`` entry means: the one place that turns what a user writes into files.

An entry is, in this order:

- a path of a file (``SUFFIXES``) or of a folder: a folder means its dataset files, at any depth
  (hidden folders skipped), and of those only the train split where it has one, found the way the
  ``datasets`` library finds it in a Hub dataset's files: a file or folder named ``train`` or
  ``training``, alone or followed by ``-``, ``_``, ``.``, a space or a digit (``train.jsonl``,
  ``data/train-00000-of-00001.parquet``, ``train/0000.parquet``), else all but the eval split's
  (``test.jsonl``: eval data is never trained on). Where the folder's card (``README.md``) declares
  ``configs:``, as a Hub dataset's may, its default config's splits decide instead (``card``). The
  report says which files were read and which left out; splits that both start so (``train_sft``,
  ``train_gen``) are both read, so name the files to read one. For ``eval_dataset`` a folder means
  its test or validation split (``SPLITS``) the same way;
- ``docs-sample``: the built-in sample (the project's docs as Q/A pairs), built on demand;
- a bare name of a file or folder in the data home's ``datasets/`` folder, with or without its extension;
- a Hugging Face Hub dataset id (``tatsu-lab/alpaca``) already in the local Hugging Face cache: its
  snapshot, read as a folder. Nothing is downloaded: a dataset is checked as the user types, and a
  download there would hold the page for minutes; the message says how to fetch one.

Anything else is given back as the path it names, and reading it says what is wrong with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sage_ft import paths
from sage_ft.data.card import CARD_NAME, CardConfig, default_config
from sage_ft.data.load import FILE_TYPES, SUFFIXES, DataError
from sage_ft.models.resolve import HUB_ID

BUILTIN_SAMPLE_NAME = "docs-sample"
# A split's file or folder names, as the ``datasets`` library infers splits from a Hub dataset's files.
SPLITS = {"train": ("train", "training"),
          "eval": ("validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation")}
_SPLIT_NAME = {split: re.compile(rf"^({'|'.join(names)})([-_. 0-9].*)?$") for split, names in SPLITS.items()}


def dataset_files(entry: str | Path, notes: list[str] | None = None, split: str = "train") -> list[Path]:
    """The files one entry means (see the module docstring); for a folder split by name, a line saying
    which files were read and which left out is added to ``notes``. ``split="eval"``: a folder means
    its test/validation split (``SPLITS``), and one without such files is refused."""
    text = str(entry).strip()
    path = Path(text).expanduser()
    if text == BUILTIN_SAMPLE_NAME and not _exists(path):
        from sage_ft.data.sample import builtin_sample_dataset

        return [builtin_sample_dataset()]
    if not _exists(path) and not path.is_absolute() and "/" not in text:
        home = paths.datasets_dir()
        path = next((c for c in (home / text, *(home / f"{text}{s}" for s in SUFFIXES)) if _exists(c)), path)
    if _exists(path) and not path.is_dir():
        return [path]
    if _exists(path) or (HUB_ID.match(text) and path.suffix.lower() not in SUFFIXES):
        folder = path if _exists(path) else hub_dataset_snapshot(text)
        files, left_out, config = split_folder(folder, split)
        if (left_out or config) and notes is not None:
            notes.append(f"{text}: {config}the {split} split, {_names(files)}"
                         + (f"; left out: {_names(left_out)}" if left_out else ""))
        return files
    return [path]


def split_folder(folder: Path, split: str = "train") -> tuple[list[Path], list[Path], str]:
    """``(read, left out, which config)``: the folder's files of ``split``, its other dataset files,
    and where its card declares several configs, which one was read (``"config 'en' (read by
    default; others: zh), "``, else ``""``). By file names: without a file named for it, the train
    split is every file not named for evaluation (eval data must never be trained on), or every file
    where all are; an eval split is refused."""
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    carded = default_config(folder)
    if carded is not None:
        return _card_split(folder, *carded, split, found)
    if not found:
        raise DataError(f"{folder}: a folder with no dataset file ({FILE_TYPES}) in it or below it; "
                        "give the folder that holds the data, or the files themselves")
    named = _of_split(found, split, lambda p: _split_parts(p, folder))
    if not named and split != "train":
        raise DataError(f"{folder}: no {split} split in it (no file or folder named {', '.join(SPLITS[split][:5])}, "
                        f"...; found {_names(found)}); give the evaluation files themselves")
    named = named or found  # every file is named for evaluation: there is nothing else to train on
    return named, [p for p in found if p not in named], ""


def _card_split(folder: Path, config: CardConfig, others: list[str], split: str,
                found: list[Path]) -> tuple[list[Path], list[Path], str]:
    """``split_folder`` for a folder whose card declares configs: the default config's splits named
    for ``split`` (for train, else every split not named for evaluation), their files matched by
    its patterns."""
    label = f"config {config.name!r} (read by default; others: {', '.join(others)}), " if others else ""
    names = _of_split(list(config.splits), split, lambda name: [name])
    if not names:
        raise DataError(f"{folder}: its card ({CARD_NAME}) gives {label}the splits {', '.join(config.splits)}; "
                        f"none of them is the {split} split. Give the files to read themselves")
    patterns = [pattern for name in names for pattern in config.splits[name]]
    try:
        matched = sorted({p for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    except (ValueError, NotImplementedError) as exc:  # a pattern pathlib cannot follow
        raise DataError(f"{folder}: its card ({CARD_NAME}) has a file pattern that cannot be read ({exc})") from None
    files = [p for p in matched if p.suffix.lower() in SUFFIXES]
    if not files:
        raise DataError(f"{folder}: its card ({CARD_NAME}) says the {split} split is {', '.join(patterns)}, which "
                        f"matches no {FILE_TYPES} file (matched: {_names(matched) if matched else 'nothing'}); "
                        "give the files to read themselves")
    return files, [p for p in found if p not in files], label


_Item = TypeVar("_Item")  # a file, or a split name of a card


def _of_split(items: list[_Item], split: str, names_of: Callable[[_Item], list[str]]) -> list[_Item]:
    """The items (files, or a card's split names) of which a name (``names_of``) names ``split``; for
    train, where none does, every item none of whose names is for evaluation."""
    def named(item: _Item, which: str) -> bool:
        return any(_SPLIT_NAME[which].match(name.lower()) for name in names_of(item))

    chosen = [item for item in items if named(item, split)]
    if not chosen and split == "train":
        chosen = [item for item in items if not named(item, "eval")]
    return chosen


def _names(files: list[Path], shown: int = 3) -> str:
    names = ", ".join(p.name for p in files[:shown])
    return f"{len(files)} file{'s' if len(files) != 1 else ''} ({names}{', ...' if len(files) > shown else ''})"


def _split_parts(file: Path, folder: Path) -> list[str]:
    """The names that may name a split: each folder below ``folder`` and the file's own stem."""
    relative = file.relative_to(folder)
    return [*relative.parts[:-1], relative.name.split(".")[0]]


def hub_dataset_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot of dataset ``repo_id`` (never downloaded here)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = paths.hf_hub_cache()
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError):
        raise DataError(
            f"{repo_id}: no such file or folder (working directory: {Path.cwd()}), and no Hugging Face dataset "
            f"{repo_id!r} in the local cache ({cache}). For a Hub dataset run `huggingface-cli download "
            f"--repo-type dataset {repo_id}` first (on a machine with network, then copy the cache folder "
            f"datasets--{repo_id.replace('/', '--')} here); otherwise check the path") from None


def cached_hub_datasets() -> list[str]:
    """Ids of the Hub datasets in the local Hugging Face cache that hold a dataset file, for pickers."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(paths.hf_hub_cache())
    except (CacheNotFound, OSError, ValueError):  # no cache yet, or not a folder: nothing cached
        return []
    return sorted(repo.repo_id for repo in info.repos if repo.repo_type == "dataset"
                  and any(f.file_name.lower().endswith(SUFFIXES) for rev in repo.revisions for f in rev.files))


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a name the file system refuses (too long): reading it says why."""
    try:
        return path.exists()
    except OSError:
        return False
