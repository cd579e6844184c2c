"""`sage-ft check-data` and `sage-ft prepare-docs` as a user runs them: real processes, exit codes, output."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.fixtures_data import ALPACA_ROWS, OPENAI_ROWS


def sage_ft(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_ft", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout


def test_check_data_good_files_exit_0_with_report(make_dataset):
    a = make_dataset("a.jsonl", ALPACA_ROWS + [{"instruction": "q", "output": ""}])
    b = make_dataset("b.json", OPENAI_ROWS)
    result = sage_ft("check-data", a, b, "--show", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Format: mixed" in out and "a.jsonl: alpaca (auto-detected" in out and "b.json: openai" in out
    assert "Rows: 6 read, 5 usable, 1 dropped" in out
    assert "empty response: 1 row (a.jsonl line 4: 'output' is empty)" in out
    assert "OK: the data can be used" in out and "[user] Say hello." in out


def test_check_data_format_mapping_and_json_output(make_dataset):
    path = make_dataset("qa.jsonl", [{"q": "Hi?", "a": "Hello."}, {"q": "Bye?", "a": ""}])
    result = sage_ft("check-data", path, "--format", "alpaca", "--column-mapping", "instruction=q,output=a",
                     "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["format"] == "alpaca" and report["rows_ok"] == 1
    assert report["dropped"] == [{"file": str(path), "location": "line 2", "reason": "empty response",
                                  "detail": "'a' is empty"}]
    assert report["preview"] == [[{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]]


def test_check_data_unusable_file_exits_1_with_reason_on_stderr(tmp_path, make_dataset):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ALPACA_ROWS[0]) + '\n{"instruction": "q", "output": \n')
    result = sage_ft("check-data", bad)
    assert result.returncode == 1
    assert "error: " in result.stderr and "bad.jsonl: line 2, column" in result.stderr
    assert "invalid JSON" in result.stderr and "NOT OK" in result.stdout
    _no_traceback(result)
    useless = make_dataset("useless.jsonl", [{"instruction": "q", "output": ""}])
    result = sage_ft("check-data", useless, "--json")
    assert result.returncode == 1 and json.loads(result.stdout)["ok"] is False
    assert "0 usable rows out of 1" in result.stderr and "empty response" in result.stderr
    _no_traceback(result)


def test_check_data_argument_problems_exit_1_without_traceback(tmp_path, make_dataset):
    missing = sage_ft("check-data", tmp_path / "missing.jsonl")
    assert missing.returncode == 1 and "missing.jsonl: file not found" in missing.stderr
    mapping = sage_ft("check-data", make_dataset("a.jsonl", ALPACA_ROWS), "--column-mapping", "nonsense")
    assert mapping.returncode == 1 and "column_mapping: 'nonsense' is not field=key" in mapping.stderr
    big = sage_ft("check-data", make_dataset("big.jsonl", ALPACA_ROWS), "--max-bytes", "10")
    assert big.returncode == 1 and "over the 10 bytes limit" in big.stderr
    for result in (missing, mapping, big):
        _no_traceback(result)


def test_check_data_with_model_reports_token_lengths(memorize_dataset):
    result = sage_ft("check-data", memorize_dataset, "--model", "demo", "--cutoff-len", "256", "--json")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)["token_stats"]
    assert stats["count"] == 4 and stats["cutoff_len"] == 256
    assert 0 < stats["min"] <= stats["mean"] <= stats["p95"] <= stats["max"] < 256
    assert stats["over_cutoff"] == 0 and stats["no_labels_after_cutoff"] == 0
    text = sage_ft("check-data", memorize_dataset, "--model", "demo", "--cutoff-len", "8")
    assert text.returncode == 1, text.stdout
    assert "Token lengths: min" in text.stdout and "4 of 4 exceed cutoff_len 8" in text.stdout
    assert "no sample keeps an assistant token within cutoff_len 8" in text.stderr
    # the report's verdict says so too (it printed "OK: the data can be used for training." above the error)
    assert "NOT OK: no sample keeps an assistant token" in text.stdout and "OK: the data" not in text.stdout
    as_json = sage_ft("check-data", memorize_dataset, "--model", "demo", "--cutoff-len", "8", "--json")
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["ok"] is False
    bad_model = sage_ft("check-data", memorize_dataset, "--model", "/nonexistent/model")
    assert bad_model.returncode == 1 and "--model /nonexistent/model" in bad_model.stderr
    assert "does not exist" in bad_model.stderr and "NOT OK: --model /nonexistent/model" in bad_model.stdout
    too_short = sage_ft("check-data", memorize_dataset, "--cutoff-len", "0")
    assert too_short.returncode == 1 and "--cutoff-len 0: training needs at least 8 tokens" in too_short.stderr
    for result in (bad_model, too_short):
        _no_traceback(result)


def test_check_data_warns_when_some_answers_are_cut_off_and_refuses_when_all_are(make_dataset):
    """'2588 keep no assistant tokens ... teach nothing' was followed by a plain 'OK'."""
    long_prompt = " ".join(f"word{i}" for i in range(120))
    long = [{"instruction": f"{long_prompt} {i}?", "output": "Yes."} for i in range(10)]
    mixed = sage_ft("check-data", make_dataset("mixed.jsonl", long + ALPACA_ROWS), "--model", "demo",
                    "--cutoff-len", "128")
    assert mixed.returncode == 0, mixed.stderr
    assert "WARNING: 10 of 13 samples keep no assistant token within cutoff_len 128" in mixed.stdout
    assert mixed.stdout.strip().endswith("OK: the data can be used for training (but see the warning).")
    as_json = json.loads(sage_ft("check-data", make_dataset("mixed.jsonl", long + ALPACA_ROWS), "--model", "demo",
                                 "--cutoff-len", "128", "--json").stdout)
    assert as_json["ok"] is True and as_json["warning"].startswith("10 of 13 samples")
    only_long = sage_ft("check-data", make_dataset("long.jsonl", long), "--model", "demo", "--cutoff-len", "128")
    assert only_long.returncode == 1 and "NOT OK: no sample keeps an assistant token" in only_long.stdout


def test_check_data_with_model_says_how_far_tokenizing_is_on_stderr(make_dataset):
    """A large file takes a while to tokenize: the first chunk of 512 conversations is reported at once
    (then every 5 s) on stderr, so ``--json`` output stays parseable."""
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(1_100)]
    result = sage_ft("check-data", make_dataset("many.jsonl", rows), "--model", "demo", "--json")
    assert result.returncode == 0, result.stderr
    assert "tokenizing 512/1,100 conversations" in result.stderr.splitlines()
    assert json.loads(result.stdout)["token_stats"]["count"] == 1_100


def test_prepare_docs_prints_count_and_path(tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.md").write_text("# Title\n\nSome words about the title that are long enough to be continued "
                              "by the assistant in a sample.\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = sage_ft("prepare-docs", src, "-o", out)
    assert result.returncode == 0, result.stderr
    assert f"Wrote 2 samples (1 section QA pairs, 1 continuations) from 1 document to {out}" in result.stdout
    assert len(out.read_text().splitlines()) == 2
    check = sage_ft("check-data", out)
    assert check.returncode == 0 and "openai" in check.stdout
    empty = sage_ft("prepare-docs", tmp_path / "nothing-here", "-o", tmp_path / "other.jsonl")
    assert empty.returncode == 1 and "nothing-here: folder not found" in empty.stderr
    # an existing file is somebody's data: replaced only on request (it was overwritten silently)
    out.write_text("precious\n")
    kept = sage_ft("prepare-docs", src, "-o", out)
    assert kept.returncode == 1 and "exists already; pass --overwrite" in kept.stderr
    assert out.read_text() == "precious\n"
    assert sage_ft("prepare-docs", src, "-o", out, "--overwrite").returncode == 0
    assert len(out.read_text().splitlines()) == 2
    below_a_file = sage_ft("prepare-docs", src, "-o", out / "x.jsonl")
    assert below_a_file.returncode == 1 and "out.jsonl is a file, not a folder" in below_a_file.stderr
    for result in (empty, kept, below_a_file):
        _no_traceback(result)


def test_prepare_docs_counts_the_documents_used_and_names_the_skipped_ones(tmp_path):
    """With two of five files not UTF-8 it said 'from 5 documents' (3 were used)."""
    src = tmp_path / "docs"
    src.mkdir()
    for name in ("a.md", "b.md", "c.txt"):
        (src / name).write_text(f"# {name}\n\nSome text about {name} for the section answer.\n", encoding="utf-8")
    for name in ("latin1.md", "cp1252.txt"):
        (src / name).write_bytes(f"# {name}\n\nCaf\xe9 cr\xe8me\n".encode("latin-1"))
    out = tmp_path / "out.jsonl"
    result = sage_ft("prepare-docs", src, "-o", out)
    assert result.returncode == 0, result.stderr
    assert "from 3 documents to" in result.stdout and "Skipped 2 documents:" in result.stdout
    assert f"{src / 'latin1.md'}: not UTF-8" in result.stdout and f"{src / 'cp1252.txt'}: not UTF-8" in result.stdout


def test_prepare_docs_builtin_and_help():
    result = sage_ft("prepare-docs", "--builtin")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("sage-ft-docs.jsonl")
    help_text = sage_ft("check-data", "--help").stdout
    assert "--column-mapping" in help_text and "instruction=question,output=answer" in help_text
