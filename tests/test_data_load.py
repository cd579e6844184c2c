"""Dataset reading and validation on real files: every format, detection, mapping, every bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from sage_ft.data import DataError, load_dataset
from sage_ft.data.formats import Reading
from sage_ft.data.load import MAX_LINE_BYTES, read_rows
from tests.fixtures_data import (
    ALPACA_ROWS,
    OPENAI_ROWS,
    SHAREGPT_ROWS,
    write_json,
    write_jsonl,
    write_parquet,
)

ROWS = {"alpaca": ALPACA_ROWS, "sharegpt": SHAREGPT_ROWS, "openai": OPENAI_ROWS}


def _roles(conversation):
    return [m["role"] for m in conversation]


def _assert_valid(conversation):
    roles = _roles(conversation)
    turns = roles[1:] if roles[0] == "system" else roles
    assert turns == ["user", "assistant"] * (len(turns) // 2) and len(turns) % 2 == 0
    assert all(isinstance(m["content"], str) and m["content"] for m in conversation)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "openai"])
def test_every_format_in_every_file_type_is_detected_and_converted(make_dataset, fmt, suffix):
    path = make_dataset(f"data{suffix}", ROWS[fmt])
    report = load_dataset(path)
    assert report.ok and report.format == fmt
    assert report.rows_total == report.rows_ok == len(ROWS[fmt]) and not report.dropped
    assert f"{fmt} (auto-detected" in report.summary()
    for conversation in report.conversations:
        _assert_valid(conversation)


def test_alpaca_fields_become_system_history_and_joined_prompt(make_dataset):
    report = load_dataset(make_dataset("a.jsonl", ALPACA_ROWS))
    hello, translate, history = report.conversations
    assert hello == [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
    assert translate == [{"role": "system", "content": "You translate."},
                         {"role": "user", "content": "Translate to French.\n\ncat"},
                         {"role": "assistant", "content": "chat"}]
    assert _roles(history) == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "Translate cat" and history[-1]["content"] == "chien"


def test_sharegpt_top_level_system_and_role_aliases(make_dataset):
    rows = SHAREGPT_ROWS + [{"conversations": [{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}]}]
    report = load_dataset(make_dataset("s.json", rows))
    assert report.conversations[1][0] == {"role": "system", "content": "Be brief."}
    assert _roles(report.conversations[2]) == ["user", "assistant"]


def test_openai_text_content_parts_are_joined(make_dataset):
    row = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
                        {"role": "assistant", "content": "Hello."}]}
    report = load_dataset(make_dataset("parts.jsonl", [row]))
    assert report.conversations[0][0] == {"role": "user", "content": "Hi there"}


def test_format_override_wins_over_detection(make_dataset):
    path = make_dataset("o.jsonl", OPENAI_ROWS)
    report = load_dataset(path, fmt="sharegpt")  # chat formats read each other's key spellings
    assert report.format == "sharegpt" and report.rows_ok == 2
    assert "sharegpt (as set, not detected)" in report.summary()
    with pytest.raises(DataError) as err:
        load_dataset(path, fmt="alpaca")
    message = str(err.value)
    assert "o.jsonl" in message and "0 usable rows" in message and "missing field 'instruction'" in message
    assert "line 1" in message and "Dataset format = openai" in message and "--format openai" in message


def test_unknown_format_name_is_refused(make_dataset):
    with pytest.raises(DataError, match="format 'csv' is not known"):
        load_dataset(make_dataset("o.jsonl", OPENAI_ROWS), fmt="csv")


def test_detection_says_what_it_saw_when_no_format_fits(make_dataset):
    with pytest.raises(DataError) as err:
        load_dataset(make_dataset("q.jsonl", [{"question": "a", "answer": "b"}]))
    message = str(err.value)
    assert "q.jsonl" in message and "cannot tell the dataset format" in message
    assert "question, answer" in message and "--column-mapping" in message


def test_column_mapping_for_alpaca(make_dataset):
    rows = [{"question": "Q1", "context": "ctx", "answer": "A1", "sys": "S"}]
    report = load_dataset(make_dataset("m.jsonl", rows),
                          column_mapping="instruction=question, input=context,output=answer,system=sys")
    assert report.format == "alpaca"
    assert report.conversations[0] == [{"role": "system", "content": "S"},
                                       {"role": "user", "content": "Q1\n\nctx"},
                                       {"role": "assistant", "content": "A1"}]


def test_column_mapping_for_chat_keys_and_role_tags(make_dataset):
    rows = [{"dialog": [{"speaker": "Q", "text": "hi"}, {"speaker": "A", "text": "yo"}], "preamble": "P"}]
    report = load_dataset(make_dataset("c.json", rows),
                          column_mapping="messages=dialog,role=speaker,content=text,user_tag=Q,assistant_tag=A,"
                                         "system=preamble")
    assert report.format == "openai"
    assert report.conversations[0] == [{"role": "system", "content": "P"}, {"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize(("mapping", "expected"), [
    ("instruction", "is not field=key"),
    ("prompt_text=q", "unknown field 'prompt_text'"),
    ("output=", "maps to an empty key name"),
])
def test_bad_column_mapping_is_explained(make_dataset, mapping, expected):
    with pytest.raises(DataError, match=expected):
        load_dataset(make_dataset("a.jsonl", ALPACA_ROWS), column_mapping=mapping)


def test_multiple_files_merge_in_order_with_formats_per_file(make_dataset):
    a = make_dataset("a.jsonl", ALPACA_ROWS)
    b = make_dataset("b.json", OPENAI_ROWS)
    for paths in (f"{a},{b}", [a, b], [str(a), b]):
        report = load_dataset(paths)
        assert report.files == [a, b] and report.rows_ok == 5 and report.format == "mixed"
        assert report.file_formats == {str(a): "alpaca", str(b): "openai"}
        assert report.conversations[0][0]["content"] == "Say hello."
        assert report.conversations[-1][-1]["content"] == "Red."
    same = load_dataset([a, make_dataset("c.jsonl", ALPACA_ROWS)])
    assert same.format == "alpaca" and same.rows_ok == 6


def test_max_samples_truncates_after_validation(make_dataset):
    rows = [{"instruction": "q", "output": ""}] + [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    report = load_dataset(make_dataset("a.jsonl", rows), max_samples=2)
    assert report.rows_ok == 5 and len(report.conversations) == 2 and len(report.dropped) == 1
    assert report.conversations[0][0]["content"] == "q0"
    assert "Using the first 2 usable rows (max_samples=2)" in report.summary()
    with pytest.raises(DataError, match="max_samples 0 must be >= 1"):
        load_dataset(make_dataset("b.jsonl", rows), max_samples=0)


def test_report_to_dict_and_preview(make_dataset):
    report = load_dataset(make_dataset("o.jsonl", OPENAI_ROWS + [{"messages": []}]))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["rows_ok"] == 2 and data["rows_dropped"] == 1
    assert data["dropped"][0]["location"] == "line 3" and data["dropped_by_reason"] == {"no messages": 1}
    assert report.preview(1) == report.conversations[:1]
    assert "conversations" in report.to_dict(include_conversations=True)


# ---------------------------------------------------------------- row-level problems

BAD_CHAT_ROWS = [
    ({"messages": [{"role": "user", "content": "q"}]}, "wrong turn order", "must end with an assistant reply"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
     "wrong turn order", "message 0 is assistant where user was expected"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": "a"}]}, "wrong turn order", "message 1 is user"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "wrong turn order", "system must come first"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "a"}]},
     "tool calls are not supported", "message 1 is a 'tool' message (a tool's result)"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]},
     "empty response", "message 1 is empty"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "a"}]},
     "empty user message", "message 0"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},
     "content is not a string", "message 1 (assistant) content is a number"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "missing field 'content'", "message 1"),
    ({"messages": "hello"}, "messages are not a list", "'messages' is a string"),
    ({"messages": [["user", "q"]]}, "message is not an object", "message 0 is a list"),
    ({"text": "no messages key", "messages_": 1}, "missing field 'messages'", "row keys: text"),
    ([1, 2], "row is not a JSON object", "got a list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a"}]}, "content is not a string", "non-text content part"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_bad_chat_rows_are_dropped_with_location_and_reason(make_dataset, suffix):
    rows = [OPENAI_ROWS[1]] + [row for row, _, _ in BAD_CHAT_ROWS]
    report = load_dataset(make_dataset(f"chat{suffix}", rows))
    assert report.rows_ok == 1 and report.ok and report.rows_total == len(rows)
    assert len(report.dropped) == len(BAD_CHAT_ROWS)
    summary = report.summary()
    for i, (issue, (_, reason, detail)) in enumerate(zip(report.dropped, BAD_CHAT_ROWS, strict=True)):
        location = f"line {i + 2}" if suffix == ".jsonl" else f"index {i + 1}"
        assert (issue.location, issue.reason) == (location, reason)
        assert detail in issue.detail
        assert issue.file.name == f"chat{suffix}"
        assert reason in summary
    assert f"chat{suffix} {'line 2' if suffix == '.jsonl' else 'index 1'}" in summary


BAD_ALPACA_ROWS = [
    ({"instruction": "q"}, "missing field 'output'"),
    ({"output": "a", "input": "x"}, "missing field 'instruction'"),
    ({"instruction": "q", "output": ""}, "empty response"),
    ({"instruction": "", "input": " ", "output": "a"}, "empty prompt"),
    ({"instruction": "q", "output": ["a"]}, "content is not a string"),
    ({"instruction": "q", "output": "a", "history": [["only one"]]}, "bad history"),
    ({"instruction": "q", "output": "a", "history": "x"}, "bad history"),
]


def test_bad_alpaca_rows_are_dropped_and_grouped_in_summary(make_dataset):
    rows = [ALPACA_ROWS[0]] + [row for row, _ in BAD_ALPACA_ROWS] + [{"instruction": "q", "output": ""}] * 4
    report = load_dataset(make_dataset("al.jsonl", rows))
    assert report.format == "alpaca" and report.rows_ok == 1
    assert [i.reason for i in report.dropped[: len(BAD_ALPACA_ROWS)]] == [r for _, r in BAD_ALPACA_ROWS]
    groups = report.dropped_by_reason()
    assert len(groups["empty response"]) == 5 and next(iter(groups)) == "empty response"  # biggest group first
    summary = report.summary()
    assert "empty response: 5 rows (al.jsonl line 4: 'output' is empty; al.jsonl line 9" in summary
    assert "and 2 more" in summary


# ---------------------------------------------------------------- file-level problems


def _error(paths, **kwargs) -> str:
    with pytest.raises(DataError) as err:
        load_dataset(paths, **kwargs)
    return str(err.value)


def test_missing_file_and_directory(tmp_path):
    message = _error(tmp_path / "nope.jsonl")
    assert "nope.jsonl: file not found" in message
    assert "a folder with no dataset file" in _error(tmp_path)  # a folder is read: tests/test_data_sources.py
    assert "no dataset file given" in _error("")


@pytest.mark.parametrize(("name", "hint"), [
    ("data.txt", "prepare-docs"), ("data", "(no extension)"),
    ("data.json.gz", "gunzip"), ("data.xlsx", "save the sheet as CSV UTF-8"),
])
def test_wrong_extension_says_what_to_do(tmp_path, name, hint):
    path = tmp_path / name
    path.write_text("instruction,output\nq,a\n")
    message = _error(path)
    assert name in message and "only .json" in message and hint in message


def test_a_spreadsheet_csv_reads_like_the_same_rows_in_json_lines(tmp_path):
    """What "Save as CSV UTF-8" writes: a byte-order mark, CRLF line ends, quoted cells holding commas,
    quotes and line breaks, empty cells. A dropped row is named by the line it starts on."""
    path = tmp_path / "sheet.csv"
    path.write_bytes("\ufeffinstruction,input,output\r\n"
                     '"Greet, politely",,"Hello, ""friend""."\r\n'
                     'Name two colours,,"Blue\r\nand green."\r\n'
                     "\r\n"
                     "Empty answer,,\r\n".encode())
    report = load_dataset(path)
    assert report.format == "alpaca" and report.rows_total == 3 and report.rows_ok == 2
    assert report.conversations[0] == [{"role": "user", "content": "Greet, politely"},
                                       {"role": "assistant", "content": 'Hello, "friend".'}]
    assert report.conversations[1][1]["content"] == "Blue\r\nand green."
    [dropped] = report.dropped
    assert dropped.location == "line 6" and "empty" in dropped.reason


@pytest.mark.parametrize(("text", "where", "what"), [
    ("instruction,output\nq,a\nq, with a comma,a\n", "line 3", "3 cells where the header (line 1) has 2"),
    ('instruction,output\nq,a\nq,"never closed\nmore\n', "line 3", "the row starting here cannot be read"),
    ("instruction,output,output\nq,a,b\n", "line 1", "names 'output' more than once"),
    ("instruction,,output\nq,x,a\n", "line 1", "column 2 of the header has no name"),
    ("instruction,output\n", "", "the file has no rows"),
])
def test_a_table_that_cannot_be_read_names_the_line_and_the_fix(tmp_path, text, where, what):
    path = tmp_path / "table.csv"
    path.write_text(text)
    message = _error(path)
    assert f"table.csv: {where}" in message and what in message


def test_a_table_not_in_utf8_says_how_to_convert_it(tmp_path):
    path = tmp_path / "latin.tsv"
    path.write_bytes("instruction\toutput\nq\ta\ncafé\tb\n".encode("cp1252"))
    message = _error(path)
    assert "latin.tsv: line 3" in message and "not UTF-8" in message and "iconv" in message


def test_a_parquet_file_reads_like_the_rows_it_was_written_from(tmp_path):
    """Parquet gives every row every column and every message every field seen anywhere; those nulls
    read as absent keys, so a tool-calling row is the only one dropped (named by its 0-based index,
    as pandas and the Hub's viewer count), and pandas' index column is not read as data."""
    rows = OPENAI_ROWS + [
        {"messages": [{"role": "user", "content": "Weather?", "name": "ann"},
                      {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
         "__index_level_0__": 7},
    ]
    pandas_index = {b"pandas": json.dumps({"index_columns": ["__index_level_0__"], "columns": []}).encode()}
    path = write_parquet(rows, tmp_path / "train-00000-of-00001.parquet", pandas_index)
    read = [row for _, row in read_rows(path)]
    assert read[:2] == OPENAI_ROWS and read[3] == {"messages": rows[3]["messages"]}
    report = load_dataset(path)
    assert report.format == "openai" and report.rows_total == 4 and report.rows_ok == 3
    assert report.conversations[:2] == load_dataset(write_jsonl(OPENAI_ROWS, tmp_path / "o.jsonl")).conversations
    [dropped] = report.dropped
    assert dropped.location == "index 2" and "tool" in dropped.reason


def test_a_parquet_file_that_cannot_be_read_says_why(tmp_path):
    good = write_parquet(ALPACA_ROWS * 50, tmp_path / "good.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    message = _error(cut)
    assert "cut.parquet: not a readable Parquet file" in message and "to_parquet" in message
    renamed = write_jsonl(ALPACA_ROWS, tmp_path / "rows.parquet")
    message = _error(renamed)
    assert "rows.parquet: not a Parquet file (it does not start with PAR1)" in message and ".jsonl" in message
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert "it does not start with PAR1, it is empty" in _error(tmp_path / "empty.parquet")
    parquet_as_jsonl = tmp_path / "table.jsonl"
    parquet_as_jsonl.write_bytes(good.read_bytes())
    assert "table.jsonl: this is a Parquet file: rename it to .parquet" in _error(parquet_as_jsonl)


def test_invalid_json_in_jsonl_names_line_and_column(make_dataset, tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ALPACA_ROWS[0]) + "\n\n" + '{"instruction": "q", "output": "a",}\n')
    message = _error(path)
    assert "broken.jsonl: line 3, column 36: invalid JSON" in message and "fix or delete line 3" in message


def test_invalid_json_in_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"instruction": "q", "output": "a"}\n  {"instruction": "q2", "output": "a2"}\n]\n')
    message = _error(path)
    assert "broken.json: line 3, column 3: invalid JSON (Expecting ',' delimiter)" in message


def test_jsonl_content_in_a_json_file_and_array_in_jsonl_get_a_rename_hint(tmp_path):
    jsonl_as_json = write_jsonl(ALPACA_ROWS, tmp_path / "rows.json")
    assert "rename it to .jsonl" in _error(jsonl_as_json)
    array_as_jsonl = write_json(ALPACA_ROWS, tmp_path / "rows.jsonl")
    message = _error(array_as_jsonl)
    assert "rows.jsonl: line 1" in message and "rename it to .json" in message


def test_json_file_that_is_not_an_array_of_objects(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": ALPACA_ROWS}))
    message = _error(wrapped)
    assert "wrapped.json" in message and "top-level JSON value is an object" in message and "'data'" in message
    scalar = tmp_path / "scalar.json"
    scalar.write_text("42")
    assert "top-level JSON value is int" in _error(scalar)
    numbers = tmp_path / "numbers.json"
    numbers.write_text("[1, 2, 3]")
    assert "numbers.json: index 0 is int, not a JSON object" in _error(numbers)
    message = _error(numbers, fmt="openai")
    assert "0 usable rows out of 3" in message and "row is not a JSON object: 3 rows" in message
    assert "index 0" in message


def test_not_utf8_names_line_and_byte_offset(tmp_path):
    for name in ("latin1.jsonl", "latin1.json"):
        path = tmp_path / name
        good = json.dumps(ALPACA_ROWS[0]) + "\n"
        bad = '{"instruction": "caf\u00e9", "output": "a"}\n'.encode("latin-1")
        path.write_bytes((f"[{good}," if name.endswith(".json") else good).encode() + bad
                         + (b"]" if name.endswith(".json") else b""))
        message = _error(path)
        offset = len(good) + (2 if name.endswith(".json") else 0) + len('{"instruction": "caf')
        assert f"{name}: line 2 (byte offset {offset}): not UTF-8 text (byte 0xE9" in message
        assert "re-save the file as UTF-8" in message


def test_utf8_bom_is_accepted_and_utf16_is_explained(tmp_path):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + (json.dumps(ALPACA_ROWS[0]) + "\n").encode())
    assert load_dataset(bom).rows_ok == 1
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_text(json.dumps(ALPACA_ROWS[0]) + "\n", encoding="utf-16")
    assert "utf16.jsonl: the file is UTF-16 text" in _error(utf16)


def test_too_large_file_is_refused_before_reading(make_dataset):
    path = make_dataset("big.jsonl", ALPACA_ROWS * 50)
    message = _error(path, max_bytes=1000)
    assert "big.jsonl" in message and "over the 1000 bytes limit" in message
    assert "--max-bytes" in message and "SAGE_FT_MAX_DATASET_BYTES" in message
    assert load_dataset(path, max_bytes=None).rows_ok == 150


def test_binary_files_renamed_jsonl_are_refused(tmp_path):
    gz = tmp_path / "data.jsonl"
    gz.write_bytes(gzip.compress(b'{"instruction": "q", "output": "a"}\n'))
    assert "data.jsonl: this is gzip-compressed data" in _error(gz)
    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(b'{"a": 1}\n' + bytes(range(256)) * 4)
    message = _error(blob)
    assert "blob.jsonl: binary data (a NUL byte at byte offset 9, line 2)" in message and "renamed" in message
    parquet = tmp_path / "table.json"
    parquet.write_bytes(b"PAR1" + b"\x15\x04" * 100)
    assert "a Parquet file" in _error(parquet)


def test_huge_single_line_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "bomb.jsonl"
    with path.open("wb") as fh:
        fh.write(json.dumps(ALPACA_ROWS[0]).encode() + b"\n")
        fh.write(b'{"instruction": "' + b"a" * (MAX_LINE_BYTES + 10) + b'", "output": "x"}\n')
    message = _error(path)
    assert "bomb.jsonl: line 2 is longer than 8.0 MiB" in message and "Split it" in message


def test_zero_usable_rows_lists_the_reasons(make_dataset):
    rows = [{"instruction": "q", "output": ""}, {"instruction": "q"}, {"instruction": "q", "output": ""}]
    message = _error(make_dataset("useless.jsonl", rows))
    assert "useless.jsonl: 0 usable rows out of 3 (read as alpaca)" in message
    assert "empty response: 2 rows (useless.jsonl line 1: 'output' is empty; useless.jsonl line 3" in message
    assert "missing field 'output': 1 row (useless.jsonl line 2" in message


def test_empty_file_and_blank_lines_only(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n"), ("empty.json", "[]")):
        path = tmp_path / name
        path.write_text(text)
        assert f"{name}: the file has no rows" in _error(path)


def test_errors_of_all_files_are_reported_together_or_collected(make_dataset, tmp_path):
    good = make_dataset("good.jsonl", ALPACA_ROWS)
    missing = tmp_path / "missing.jsonl"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    with pytest.raises(DataError) as err:
        load_dataset([good, missing, bad])
    assert len(err.value.problems) == 2 and "missing.jsonl: file not found" in str(err.value)
    assert "bad.jsonl: line 1, column 2" in str(err.value)
    assert err.value.report is not None and err.value.report.rows_ok == 3
    report = load_dataset([good, missing, bad], raise_on_error=False)
    assert not report.ok and report.rows_ok == 3 and len(report.errors) == 2
    assert "NOT OK" in report.summary() and "missing.jsonl" in report.summary()


def test_importing_the_package_does_not_load_tokenisation():
    code = ("import sys, sage_ft.data as d; assert 'sage_ft.data.tokenize' not in sys.modules; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; "
            "f = d.tokenize_conversations; assert callable(f); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ---------------------------------------------------------------- what to do when no row can be read

@pytest.mark.parametrize(("row", "mapping"), [
    ({"prompt": "Say hi.", "completion": "Hi!"}, "instruction=prompt,output=completion"),
    ({"Instruction": "Say hi.", "Input": "", "Output": "Hi!"}, "instruction=Instruction,output=Output,input=Input"),
    ({"id": 7, "user_question": "Say hi.", "bot_reply": "Hi!"}, "instruction=user_question,output=bot_reply"),
    ({"question": "Say hi.", "context": "greeting", "answer": "Hi!"}, "instruction=question,output=answer,input=context"),
])
def test_the_suggested_column_mapping_is_built_from_the_keys_seen(make_dataset, row, mapping):
    """The fix offered was always 'instruction=question,output=answer', whatever the keys, and in CLI
    flags only. It is built from the file's own keys, names the web UI's fields and the command line's
    flags, and loading with it works."""
    path = make_dataset("keys.jsonl", [row, row])
    for fmt in ("auto", "alpaca"):  # undetectable, and read as alpaca with every row dropped
        with pytest.raises(DataError) as err:
            load_dataset(path, fmt=fmt)
        message = str(err.value)
        assert f"Column mapping = '{mapping}'" in message and f"--column-mapping '{mapping}'" in message
        assert "web UI: Data options" in message
        assert "question" in mapping or "instruction=question,output=answer" not in message  # not the old fixed text
        # the same reading, for a client to apply with one click (the Train tab's 🪄 button)
        assert err.value.reading == Reading("alpaca", mapping)
        assert load_dataset(path, fmt=fmt, raise_on_error=False).suggested_reading == Reading("alpaca", mapping)
    report = load_dataset(path, fmt="alpaca", column_mapping=mapping)
    assert report.rows_ok == 2 and report.conversations[0][-1] == {"role": "assistant", "content": "Hi!"}
    assert report.suggested_reading is None


def test_a_reading_is_suggested_only_where_it_would_read_every_file(make_dataset):
    """Format and column mapping apply to every file of a dataset: a one-click reading is offered only
    when no file was read as it is and all the unreadable ones ask for the same."""
    qa = make_dataset("qa.csv", [{"Question": "Hi?", "Answer": "Hi!"}])
    also_qa = make_dataset("qa2.jsonl", [{"Question": "Yo?", "Answer": "Yo!"}])
    other = make_dataset("pc.jsonl", [{"prompt": "Hi?", "completion": "Hi!"}])
    fine = make_dataset("fine.jsonl", OPENAI_ROWS)
    blank = make_dataset("blank.jsonl", [{"a": 1}])  # nothing to suggest
    suggested = lambda *paths: load_dataset(",".join(map(str, paths)), raise_on_error=False).suggested_reading  # noqa: E731
    assert suggested(qa, also_qa) == Reading("alpaca", "instruction=Question,output=Answer")
    assert suggested(qa, other) is None and suggested(qa, fine) is None and suggested(qa, blank) is None


def test_a_chat_under_other_key_and_role_names_gets_a_chat_mapping(make_dataset):
    row = {"dialog": [{"speaker": "Q", "text": "Hi"}, {"speaker": "A", "text": "Hello."}]}
    with pytest.raises(DataError) as err:
        load_dataset(make_dataset("dialog.jsonl", [row]))
    mapping = "messages=dialog,role=speaker,content=text,user_tag=Q,assistant_tag=A"
    assert f"Dataset format = openai and Column mapping = '{mapping}'" in str(err.value)
    assert load_dataset(make_dataset("dialog.jsonl", [row]), fmt="openai", column_mapping=mapping).rows_ok == 1


TOOL_CALL_ROW = {"messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny in Paris."}]}


def test_tool_calling_rows_are_said_to_be_unsupported(make_dataset):
    """Tool-calling rows were all dropped as 'message 1 is empty', which reads as a data mistake."""
    with pytest.raises(DataError) as err:
        load_dataset(make_dataset("tools.jsonl", [TOOL_CALL_ROW] * 3))
    message = str(err.value)
    assert "tool calls are not supported: 3 rows" in message and "message 1 is an assistant tool call" in message
    assert "not supported for training" in message and "is empty" not in message
    assert "Column mapping" not in message  # no mapping fixes it
    report = load_dataset(make_dataset("mixed.jsonl", [OPENAI_ROWS[1], TOOL_CALL_ROW]))
    assert report.rows_ok == 1 and [i.reason for i in report.dropped] == ["tool calls are not supported"]
