"""What a ``dataset:`` entry means: files, folders (a Hub dataset's train split), data-home names,
``docs-sample`` and Hub dataset ids in a real (locally built) Hugging Face cache."""

from __future__ import annotations

import secrets

import pytest

from sage_ft.data import DataError, load_dataset
from sage_ft.data.sources import cached_hub_datasets, dataset_files
from tests.fixtures_data import (
    ALPACA_ROWS,
    HUB_SNAPSHOT,
    OPENAI_ROWS,
    cache_hub_dataset,
    write_hub_dataset,
    write_jsonl,
)


def test_a_folder_means_its_train_split_where_it_names_one(tmp_path):
    folder = write_hub_dataset(tmp_path / "alpaca-like")
    assert [p.name for p in dataset_files(folder)] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    report = load_dataset(str(folder))
    assert report.ok and report.format == "alpaca" and report.rows_ok == len(ALPACA_ROWS) + 2
    assert len(report.files) == 2 and "train-00001-of-00002.parquet: alpaca" in report.summary()
    assert (f"{folder}: the train split, 2 files (train-00000-of-00002.parquet, train-00001-of-00002.parquet); "
            "left out: 1 file (test-00000-of-00001.parquet)") in report.summary()
    for name in ("train.jsonl", "training_set.jsonl"):  # other spellings of the split
        assert dataset_files(write_jsonl(OPENAI_ROWS, tmp_path / "named" / name).parent)[-1].name == name
    split_folder = tmp_path / "by-folder"
    write_jsonl(OPENAI_ROWS, split_folder / "train" / "0000.jsonl")
    write_jsonl(OPENAI_ROWS, split_folder / "validation" / "0000.jsonl")
    assert dataset_files(split_folder) == [split_folder / "train" / "0000.jsonl"]


def test_eval_data_from_a_folder_is_its_test_or_validation_split(tmp_path):
    folder = write_hub_dataset(tmp_path / "hub")
    report = load_dataset(str(folder), split="eval")
    assert [p.name for p in report.files] == ["test-00000-of-00001.parquet"] and report.format == "openai"
    assert "the eval split, 1 file (test-00000-of-00001.parquet); left out: 2 files" in report.summary()
    write_jsonl(OPENAI_ROWS, tmp_path / "only-train" / "train.jsonl")
    with pytest.raises(DataError, match=r"only-train: no eval split in it \(no file or folder named validation, "
                                        r"valid, val, dev, test, \.\.\.; found 1 file \(train\.jsonl\)\)"):
        load_dataset(str(tmp_path / "only-train"), split="eval")
    assert dataset_files(write_jsonl(OPENAI_ROWS, tmp_path / "dev.jsonl"), split="eval") == [tmp_path / "dev.jsonl"]


def test_a_folder_without_split_names_means_all_its_files_and_an_empty_one_says_so(tmp_path):
    mine = tmp_path / "mine"
    write_jsonl(OPENAI_ROWS, mine / "chats.jsonl")
    write_jsonl(ALPACA_ROWS, mine / "more" / "qa.jsonl")
    (mine / "notes.txt").write_text("not data")
    assert dataset_files(mine) == [mine / "chats.jsonl", mine / "more" / "qa.jsonl"]
    report = load_dataset(str(mine))
    assert report.format == "mixed" and "left out" not in report.summary()
    write_jsonl(ALPACA_ROWS, mine / "test.jsonl")  # named for evaluation: never trained on
    assert dataset_files(mine) == [mine / "chats.jsonl", mine / "more" / "qa.jsonl"]
    assert dataset_files(mine, split="eval") == [mine / "test.jsonl"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: a folder with no dataset file \(\.json/\.jsonl/.*\.parquet\)"):
        load_dataset(str(tmp_path / "empty"))


def test_a_hub_dataset_in_the_local_cache_is_read_by_its_id(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache_hub_dataset(cache, "tiny-org/alpaca-like")
    model = cache / "models--tiny-org--a-model" / "snapshots" / HUB_SNAPSHOT
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert cached_hub_datasets() == ["tiny-org/alpaca-like"]  # what the Train tab's list offers; no model
    report = load_dataset("tiny-org/alpaca-like")
    assert report.ok and report.rows_ok == len(ALPACA_ROWS) + 2
    assert all(HUB_SNAPSHOT in str(p) and p.name.startswith("train-") for p in report.files)
    with pytest.raises(DataError) as err:
        load_dataset("tiny-org/not-downloaded")
    message = str(err.value)
    assert "no Hugging Face dataset 'tiny-org/not-downloaded' in the local cache" in message and str(cache) in message
    assert "huggingface-cli download --repo-type dataset tiny-org/not-downloaded" in message
    with pytest.raises(DataError, match="train.jsonl: file not found"):  # a path, not an id: no Hub talk
        load_dataset("data/train.jsonl")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "no-cache-yet"))
    assert cached_hub_datasets() == []


def test_names_in_the_data_home_and_the_builtin_sample(data_home):
    name = f"saved-{secrets.token_hex(4)}"
    write_jsonl(OPENAI_ROWS, data_home / "datasets" / f"{name}.jsonl")
    assert load_dataset(name).rows_ok == len(OPENAI_ROWS)
    assert load_dataset(f"{name}.jsonl").rows_ok == len(OPENAI_ROWS)
    [sample] = dataset_files("docs-sample")
    assert sample.parent == data_home / "datasets" and load_dataset("docs-sample").ok
