"""Shared fixtures of the data area: write small dataset files for any test that needs one.

- ``write_jsonl(rows, path)`` / ``write_json(rows, path)`` / ``write_table(rows, path)`` /
  ``write_parquet(rows, path)``: plain helpers (a table is written the way ``pandas.DataFrame.to_csv``
  writes it: a header of every key, list cells as JSON; a Parquet file by pyarrow, as the Hub's
  datasets are, a key missing from a row being null there).
- ``make_dataset(name, rows)``: a factory writing into the test's ``tmp_path`` (``.json`` names
  become a JSON array, ``.csv``/``.tsv`` a table, ``.parquet`` Parquet, anything else JSON Lines).
- ``write_hub_dataset(folder)`` / ``cache_hub_dataset(cache, repo_id)``: a Hub dataset's files as the
  Hub lays them out (train/test Parquet shards under data/, a README, a hidden folder), alone or as
  the snapshot of a Hugging Face cache.
- ``memorize_dataset``: 4 short Q/A pairs in OpenAI messages format, for trainer tests whose loss
  must fall; ``MEMORIZE_PAIRS`` holds the same pairs for asserting on generations.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

MEMORIZE_PAIRS = [
    ("What colour is the sky?", "Blue."),
    ("What is two plus two?", "Four."),
    ("Who wrote Hamlet?", "Shakespeare."),
    ("What is the capital of France?", "Paris."),
]

ALPACA_ROWS = [
    {"instruction": "Say hello.", "input": "", "output": "Hello!"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat", "system": "You translate."},
    {"instruction": "And dog?", "output": "chien", "history": [["Translate cat", "chat"]]},
]
SHAREGPT_ROWS = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"},
                                              {"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "6"}]},
]
OPENAI_ROWS = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
]


def write_jsonl(rows: Iterable[Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(rows: list[Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def write_table(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, columns, delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    return path


def write_parquet(rows: list[dict], path: str | Path, metadata: dict[bytes, bytes] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table.replace_schema_metadata(metadata) if metadata else table, path)
    return path


HUB_SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_dataset(root: Path) -> Path:
    """Train rows: ``ALPACA_ROWS`` then its first two, in two shards; a test split of ``OPENAI_ROWS``;
    a README and a hidden folder that are not data."""
    write_parquet(ALPACA_ROWS, root / "data" / "train-00000-of-00002.parquet")
    write_parquet(ALPACA_ROWS[:2], root / "data" / "train-00001-of-00002.parquet")
    write_parquet(OPENAI_ROWS, root / "data" / "test-00000-of-00001.parquet")
    write_jsonl(SHAREGPT_ROWS, root / ".cache" / "huggingface" / "stale.jsonl")
    (root / "README.md").write_text("---\nlicense: mit\n---\n# a dataset\n")
    return root


def cache_hub_dataset(cache: Path, repo_id: str) -> Path:
    """``write_hub_dataset`` as the snapshot of ``repo_id`` in the Hugging Face cache ``cache``."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_SNAPSHOT)
    return write_hub_dataset(repo / "snapshots" / HUB_SNAPSHOT)


def memorize_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in MEMORIZE_PAIRS]


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[[str, list[Any]], Path]:
    """``make_dataset("train.jsonl", rows)`` -> the written file under ``tmp_path``."""

    def make(name: str, rows: list[Any]) -> Path:
        path = tmp_path / name
        if path.suffix in (".csv", ".tsv"):
            return write_table(rows, path)
        if path.suffix == ".parquet":
            return write_parquet(rows, path)
        return write_json(rows, path) if path.suffix == ".json" else write_jsonl(rows, path)

    return make


@pytest.fixture
def memorize_dataset(tmp_path: Path) -> Path:
    """A .jsonl of 4 short Q/A pairs (OpenAI messages) that a tiny model can memorise."""
    return write_jsonl(memorize_rows(), tmp_path / "memorize.jsonl")
