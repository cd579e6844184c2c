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


CARD = """---
license: mit
configs:
- config_name: en
  default: true
  data_files:
  - split: train
    path: en/part-*.jsonl
  - split: validation
    path: en/holdout.jsonl
- config_name: zh
  data_files: zh/*.jsonl
- config_name: broken
---
# a dataset in two languages
"""


def test_a_card_that_declares_configs_decides_the_subset_and_the_splits(tmp_path):
    """A Hub dataset's README may say which files make each split and which subset is read by default
    (as the ``datasets`` library reads it); by file names alone, both languages and the held-out file
    here would all have been trained on."""
    folder = tmp_path / "two-languages"
    for name in ("part-0.jsonl", "part-1.jsonl", "holdout.jsonl"):
        write_jsonl(OPENAI_ROWS, folder / "en" / name)
    write_jsonl(ALPACA_ROWS, folder / "zh" / "a.jsonl")
    (folder / "README.md").write_text(CARD)  # its config "broken" has no data_files: only the default's are read
    report = load_dataset(str(folder))
    assert [p.relative_to(folder).as_posix() for p in report.files] == ["en/part-0.jsonl", "en/part-1.jsonl"]
    assert report.format == "openai" and report.rows_ok == 2 * len(OPENAI_ROWS)
    assert (f"{folder}: config 'en' (read by default; others: zh, broken), the train split, 2 files (part-0.jsonl, "
            "part-1.jsonl); left out: 2 files (holdout.jsonl, a.jsonl)") in report.summary()
    assert dataset_files(folder, split="eval") == [folder / "en" / "holdout.jsonl"]
    # one config, splits as a mapping: train_sft is its train split, test_sft its eval split
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                      "    train_sft: en/part-*.jsonl\n    test_sft: [en/holdout.jsonl]\n---\n")
    assert dataset_files(folder) == [folder / "en" / "part-0.jsonl", folder / "en" / "part-1.jsonl"]
    assert dataset_files(folder, split="eval") == [folder / "en" / "holdout.jsonl"]
    assert "config" not in load_dataset(str(folder)).summary()  # one config: nothing to say about it


def test_a_card_that_cannot_be_followed_says_what_is_wrong_with_it(tmp_path):
    folder = tmp_path / "carded"
    write_jsonl(OPENAI_ROWS, folder / "data" / "train.jsonl")
    card = folder / "README.md"
    card.write_text("---\nconfigs:\n- config_name: default\n  data_files: [data/*.arrow\n---\n")
    with pytest.raises(DataError, match=r"README\.md: its YAML header cannot be read \(line \d+\)"):
        load_dataset(str(folder))
    card.write_text("---\nconfigs:\n- config_name: default\n  data_files: data/*.arrow\n---\n")
    with pytest.raises(DataError, match=r"its card \(README\.md\) says the train split is data/\*\.arrow, which "
                                        r"matches no \.json/.*file \(matched: nothing\)"):
        load_dataset(str(folder))
    with pytest.raises(DataError, match=r"gives the splits train; none of them is the eval split"):
        load_dataset(str(folder), split="eval")
    card.write_text("---\nconfigs:\n- config_name: default\n  data_files: data/../../secret/*.jsonl\n---\n")
    with pytest.raises(DataError, match=r"'data/\.\./\.\./secret/\*\.jsonl' leaves the dataset's folder"):
        load_dataset(str(folder))
    card.write_text("---\nconfigs:\n- config_name: default\n  data_files: 7\n---\n")
    with pytest.raises(DataError, match=r"config 'default' has no readable `data_files`"):
        load_dataset(str(folder))
    # a README of one's own whose front matter YAML cannot read, and that declares no configs: file names decide
    card.write_text("---\ntitle: [unclosed\n---\nmy notes\n")
    assert load_dataset(str(folder)).rows_ok == len(OPENAI_ROWS)
