"""A Hub dataset's card (its ``README.md``): the ``configs:`` of its YAML header, which say which files
make each split (``data_files``) and which subset is the default, as the ``datasets`` library reads
them. Where a card declares them they decide; without, the file names do (``sources.split_folder``).

A multi-language dataset (``en/…``, ``zh/…``) or one with ``train_sft`` and ``train_gen`` files is
split this way: read by file names alone, every subset would be trained on at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from sage_ft.data.load import DataError

CARD_NAME = "README.md"
_HEADER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)


@dataclass(frozen=True)
class CardConfig:
    """One config (subset) a card declares: its split names, each with its file patterns (globs
    relative to the dataset's folder), in the card's order."""

    name: str
    splits: dict[str, list[str]]


def default_config(folder: Path) -> tuple[CardConfig, list[str]] | None:
    """The config the card in ``folder`` reads by default (``default: true``, else the one named
    ``default``, else the first listed) and the other configs' names; None without a card, a YAML
    header or ``configs:``. Only the default's ``data_files`` are read (a quirk in another config must
    not block this one). A header that cannot be read is an error only where it mentions ``configs``
    (a README of one's own may start with any front matter)."""
    card = folder / CARD_NAME
    if not card.is_file():
        return None
    header = _HEADER.match(card.read_text(encoding="utf-8", errors="replace"))
    if header is None:
        return None
    try:
        meta = yaml.safe_load(header.group(1))
    except yaml.YAMLError as exc:
        if "configs" not in header.group(1):
            return None
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 2})" if mark is not None else ""  # +1 for the opening ---, +1 from 0-based
        raise DataError(f"{card}: its YAML header cannot be read{where}: {getattr(exc, 'problem', exc)}; fix it, "
                        "or give the data files themselves") from None
    entries = meta.get("configs") if isinstance(meta, dict) else None
    if entries is None or entries == []:
        return None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise DataError(f"{card}: `configs:` must be a list of configs (config_name, data_files), not {entries!r}")
    names = [str(e.get("config_name", "default")) for e in entries]
    first = next((i for i, e in enumerate(entries) if e.get("default") is True), None)
    if first is None:
        first = names.index("default") if "default" in names else 0
    config = CardConfig(names[first], _splits(card, names[first], entries[first].get("data_files")))
    return config, names[:first] + names[first + 1:]


def _splits(card: Path, name: str, files: Any) -> dict[str, list[str]]:
    """Config ``name``'s ``data_files`` in each form the ``datasets`` library takes: a pattern or a
    list of them (the train split), ``{split: pattern(s)}``, or a list of ``{split, path}``."""
    if isinstance(files, str) or (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        return {"train": _patterns(card, name, files)}
    if isinstance(files, dict):
        return {str(split): _patterns(card, name, paths) for split, paths in files.items()}
    if isinstance(files, list) and all(isinstance(f, dict) and "path" in f for f in files):
        splits: dict[str, list[str]] = {}
        for f in files:
            splits.setdefault(str(f.get("split", "train")), []).extend(_patterns(card, name, f["path"]))
        return splits
    raise DataError(f"{card}: config {name!r} has no readable `data_files` "
                    f"(a path pattern, a list of them, or a list of {{split, path}}; found {files!r})")


def _patterns(card: Path, name: str, paths: Any) -> list[str]:
    patterns = [paths] if isinstance(paths, str) else paths
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise DataError(f"{card}: config {name!r}: a `path` must be a file pattern or a list of them, not {paths!r}")
    patterns = [p.lstrip("/") for p in patterns]
    outside = [p for p in patterns if ".." in PurePosixPath(p).parts]
    if outside:  # a card comes with a download: it names files in its own folder, nowhere else
        raise DataError(f"{card}: config {name!r}: {outside[0]!r} leaves the dataset's folder; a card's paths stay "
                        "inside it")
    return patterns
