"""Documents -> dataset on real folders: sections, continuations, determinism, the built-in sample."""

from __future__ import annotations

import json
import os

import pytest

from sage_ft import paths
from sage_ft.data import DataError, builtin_sample_dataset, load_dataset, prepare_docs
from sage_ft.data.docs import QUESTION
from sage_ft.data.sample import SAMPLE_NAME, sample_sources

GUIDE = """# Widget Guide

The widget turns knobs into dials and back again.

## Installation

Run the installer. It copies the widget into place and checks that every knob is where it should be
before the first dial is turned, so nothing breaks later on.

```bash
# not a heading: inside a code fence
make install
```

## Empty section

## Usage

Turn the knob.

Troubleshooting
---------------

If the dial sticks, oil it.
"""

FAQ = """# FAQ

## Usage

Ask questions here.
"""


def _rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _qa(rows):
    return {r["messages"][0]["content"]: r["messages"][1]["content"] for r in rows
            if r["messages"][0]["content"].startswith("What does the documentation say about")}


@pytest.fixture
def docs_dir(tmp_path):
    src = tmp_path / "docs"
    (src / "sub").mkdir(parents=True)
    (src / "guide.md").write_text(GUIDE, encoding="utf-8")
    (src / "sub" / "faq.md").write_text(FAQ, encoding="utf-8")
    (src / "notes.txt").write_text("Plain notes without any heading at all.\n", encoding="utf-8")
    (src / ".hidden").mkdir()
    (src / ".hidden" / "secret.md").write_text("# Secret\n\nnever read\n", encoding="utf-8")
    (src / "image.png").write_bytes(b"\x89PNG")
    return src


def test_sections_become_qa_pairs_and_paragraphs_continuations(docs_dir, tmp_path):
    result = prepare_docs(docs_dir, tmp_path / "out" / "docs.jsonl")
    rows = _rows(result.path)
    assert result.count == len(rows) == result.qa_pairs + result.continuations
    assert [p.name for p in result.sources] == ["guide.md", "notes.txt", "faq.md"]
    qa = _qa(rows)
    assert qa[QUESTION.format(title="Widget Guide")] == "The widget turns knobs into dials and back again."
    install = qa[QUESTION.format(title="Installation")]
    assert install.startswith("Run the installer.") and "# not a heading" in install and "make install" in install
    assert qa[QUESTION.format(title="Troubleshooting")] == "If the dial sticks, oil it."
    assert qa[QUESTION.format(title="notes")] == "Plain notes without any heading at all."
    # the same title in two documents is qualified with the document title
    assert qa[QUESTION.format(title="Usage (Widget Guide)")] == "Turn the knob."
    assert qa[QUESTION.format(title="Usage (FAQ)")] == "Ask questions here."
    assert not any("Empty section" in q for q in qa) and not any("Secret" in q for q in qa)
    assert len(qa) == result.qa_pairs == 6
    # one paragraph is long enough (>= 12 words) for a continuation sample: split at its middle word
    continuations = [r["messages"] for r in rows if not r["messages"][0]["content"].startswith("What does")]
    assert len(continuations) == result.continuations == 1
    user, assistant = continuations[0][0]["content"], continuations[0][1]["content"]
    assert user.startswith("Run the installer.") and assistant.endswith("nothing breaks later on.")
    assert f"{user} {assistant}".split() == install.split("\n\n")[0].split()
    report = load_dataset(result.path)
    assert report.ok and report.format == "openai" and report.rows_ok == result.count


def test_output_is_deterministic(docs_dir, tmp_path):
    first = prepare_docs(docs_dir, tmp_path / "a.jsonl").path.read_bytes()
    second = prepare_docs(docs_dir, tmp_path / "b.jsonl").path.read_bytes()
    assert first == second


def test_long_sections_are_split_into_parts(tmp_path):
    src = tmp_path / "long"
    src.mkdir()
    paragraphs = [f"Paragraph {i} " + "word " * 30 for i in range(6)]
    (src / "long.md").write_text("# Long\n\n" + "\n\n".join(paragraphs), encoding="utf-8")
    result = prepare_docs(src, tmp_path / "long.jsonl", max_answer_chars=400)
    qa = _qa(_rows(result.path))
    parts = [q for q in qa if "(part " in q]
    assert len(parts) == 3 and QUESTION.format(title="Long (part 1 of 3)") in qa
    assert all(len(answer) <= 400 for answer in qa.values())
    assert "".join(qa[q] for q in parts).count("Paragraph") == 6


def test_unreadable_documents_are_skipped_and_named(docs_dir, tmp_path):
    (docs_dir / "latin1.md").write_bytes("# Caf\xe9\n\ntext\n".encode("latin-1"))
    result = prepare_docs(docs_dir, tmp_path / "out.jsonl")
    assert len(result.skipped) == 1 and "latin1.md: not UTF-8 (byte offset 5)" in result.skipped[0]
    assert all(p.name != "latin1.md" for p in result.sources)  # sources are the documents used
    (docs_dir / "empty.md").write_text("# Only a heading\n", encoding="utf-8")
    again = prepare_docs(docs_dir, tmp_path / "again.jsonl")
    assert len(again.sources) == len(result.sources) and any("empty.md: no text" in s for s in again.skipped)


def test_bad_source_folders_are_explained(tmp_path):
    with pytest.raises(DataError, match="folder not found"):
        prepare_docs(tmp_path / "missing", tmp_path / "out.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .md, .markdown or .txt documents found"):
        prepare_docs(tmp_path / "empty", tmp_path / "out.jsonl")
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.md").write_text("# Only a title\n\n## And another\n")
    with pytest.raises(DataError, match="no text to learn from in 1 document"):
        prepare_docs(blank, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_prepare_docs_on_the_project_docs(tmp_path):
    sources = sample_sources()
    assert paths.project_root() / "docs" / "architecture.md" in sources
    result = prepare_docs(sources, tmp_path / "project.jsonl")
    assert result.qa_pairs >= 5 and result.continuations >= 1 and not result.skipped
    assert QUESTION.format(title="Run directory layout (written by training, read by everyone)") in _qa(
        _rows(result.path))
    assert load_dataset(result.path).ok


def test_builtin_sample_is_built_once_and_rebuilt_when_stale():
    path = builtin_sample_dataset()
    assert path == paths.datasets_dir() / SAMPLE_NAME and path.is_file()
    report = load_dataset(path)
    assert report.ok and report.rows_ok > 10
    stamp = path.stat().st_mtime_ns
    assert builtin_sample_dataset().stat().st_mtime_ns == stamp  # fresh: not rewritten
    os.utime(path, (0, 0))  # older than its sources: rebuilt
    assert builtin_sample_dataset().stat().st_mtime > 0
    assert _rows(path) == _rows(builtin_sample_dataset(force=True))
