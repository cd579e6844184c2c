"""Read and validate dataset files before any training starts.

``load_dataset`` reads ``.json`` (an array of objects), ``.jsonl`` (one object per line),
``.csv`` / ``.tsv`` (a header row, then one row per example; see ``delimited``) and ``.parquet``
(one row per example, as the Hugging Face Hub stores datasets; see ``parquet``) files, detects or
applies their format (see ``formats``), converts every row into a conversation, and returns a
``DatasetReport``. Two kinds of problems:

- file-level (``DataError``): the file cannot be used at all — not found, wrong extension, too big,
  binary, not UTF-8, invalid JSON, not an array of objects, a table row whose cells do not match its
  header, an unreadable Parquet file, a line over ``MAX_LINE_BYTES``, or zero usable rows. The
  message names the file, the place (line/column, byte offset or index), what is wrong and what to
  do. A bad file never starts a run.
- row-level (``RowIssue`` in ``report.dropped``): one row is unusable (missing field, empty
  response, unknown role, wrong turn order, ...). The row is dropped and reported, nothing aborts
  unless no usable row is left.

Memory: a file is refused before reading when it is over ``max_bytes``; JSON Lines are read line by
line with a bounded ``readline`` so a single enormous line (zip-bomb style) is refused after reading
at most ``MAX_LINE_BYTES`` of it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_ft.data import parquet
from sage_ft.data.delimited import DELIMITERS, TableError, read_table
from sage_ft.data.formats import (
    FORMATS,
    GENERIC_READING,
    TOOL_CALLS_HELP,
    TOOL_CALLS_REASON,
    MappingError,
    Reading,
    RowError,
    convert_row,
    detect_row_format,
    parse_column_mapping,
    suggest_reading,
)

# Files over this size are refused unless the caller (or SAGE_FT_MAX_DATASET_BYTES) raises the limit.
DEFAULT_MAX_BYTES = int(os.environ.get("SAGE_FT_MAX_DATASET_BYTES") or 512 * 1024**2)
# One JSON Lines row larger than this is refused: a real training sample is a few KB of text.
MAX_LINE_BYTES = 8 * 1024**2
DETECT_ROWS = 20  # auto-detection looks at this many rows at the top of each file
SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
FILE_TYPES = "/".join(SUFFIXES)  # for messages: ".json/.jsonl/.csv/.tsv/.parquet"
_SHOWN_LOCATIONS = 3  # per reason in the summary

_CONVERT_HINTS = {
    ".xlsx": "save the sheet as CSV UTF-8 (File > Save As) and pass the .csv",
    ".xls": "save the sheet as CSV UTF-8 (File > Save As) and pass the .csv",
    ".gz": f"decompress it first (gunzip FILE) and pass the {FILE_TYPES} inside",
    ".zip": f"unzip it first and pass the {FILE_TYPES} files inside",
    ".txt": "for plain documents use `sage-ft prepare-docs DIR -o data.jsonl` to build a dataset",
    ".md": "for plain documents use `sage-ft prepare-docs DIR -o data.jsonl` to build a dataset",
}
_MAGIC = {
    b"\x1f\x8b": "gzip-compressed data: decompress it first (gunzip)",
    b"PK\x03\x04": f"a zip archive: unzip it and pass the {FILE_TYPES} inside",
    parquet.MAGIC: "a Parquet file: rename it to .parquet",
    b"SQLite format 3": "an SQLite database, not a dataset file",
    b"\x89PNG": "a PNG image, not a dataset file",
    b"%PDF": "a PDF document: extract its text and use `sage-ft prepare-docs`",
}


class DataError(ValueError):
    """A dataset that cannot be used. ``problems`` lists each file-level problem; ``report`` is the
    partial report (rows of the files that were fine) when one exists; ``reading`` the format and
    column mapping that would read the file's rows, when its keys suggest one."""

    def __init__(self, message: str, problems: list[str] | None = None, report: DatasetReport | None = None,
                 reading: Reading | None = None):
        super().__init__(message)
        self.problems = problems or [message]
        self.report = report
        self.reading = reading


@dataclass
class RowIssue:
    """A dropped row: ``location`` is ``"line 7"`` (jsonl, csv, tsv) or ``"index 3"`` (json array, parquet)."""

    file: Path
    location: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.file}: {self.location}: {self.reason}" + (f" ({self.detail})" if self.detail else "")

    def to_dict(self) -> dict[str, str]:
        return {"file": str(self.file), "location": self.location, "reason": self.reason, "detail": self.detail}


@dataclass
class TokenStats:
    """Token lengths of the conversations rendered with the chat template (before truncation)."""

    count: int
    min: int
    mean: float
    p95: int
    max: int
    cutoff_len: int
    over_cutoff: int  # samples longer than cutoff_len (they get truncated)
    no_labels_after_cutoff: int  # samples whose assistant tokens all fall beyond cutoff_len
    sampled_from: int | None = None  # the rows there were, when ``count`` of them spread over all were measured

    @property
    def teaches_nothing(self) -> bool:
        """No measured sample keeps an assistant token: the run would fail after loading the model."""
        return self.count > 0 and self.no_labels_after_cutoff == self.count

    def _measured(self) -> str:
        return f" (measured on {self.count} of the {self.sampled_from} rows)" if self.sampled_from else ""

    def problem(self) -> str | None:
        """Why the data cannot be trained on at this cutoff_len, or None."""
        if not self.teaches_nothing:
            return None
        return (f"no sample keeps an assistant token within cutoff_len {self.cutoff_len}{self._measured()}: "
                "truncation cuts every answer off, so training would have nothing to learn; raise cutoff_len "
                "or shorten the prompts")

    def warning(self) -> str | None:
        """Some (not all) samples lose every assistant token to truncation: they train nothing."""
        if not self.no_labels_after_cutoff or self.teaches_nothing:
            return None
        return (f"{self.no_labels_after_cutoff} of {self.count} samples keep no assistant token within cutoff_len "
                f"{self.cutoff_len}{self._measured()} and teach nothing; raise cutoff_len or shorten their prompts")

    def summary(self) -> str:
        return (f"Token lengths{self._measured()}: min {self.min}, mean {self.mean:.1f}, p95 {self.p95}, "
                f"max {self.max}; {self.over_cutoff} of {self.count} exceed cutoff_len {self.cutoff_len} (truncated)")


@dataclass
class DatasetReport:
    """What ``load_dataset`` found. ``conversations`` are the usable rows (after ``max_samples``)."""

    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    format: str = ""  # alpaca / sharegpt / openai, or "mixed" when files differ (see file_formats)
    files: list[Path] = field(default_factory=list)
    rows_total: int = 0
    rows_ok: int = 0  # valid rows before max_samples; len(conversations) is what training uses
    dropped: list[RowIssue] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # file-level problems (only with raise_on_error=False)
    file_formats: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # how each file's format was chosen
    max_samples: int | None = None
    token_stats: TokenStats | None = None
    readings: list[Reading] = field(default_factory=list)  # what each unreadable file's keys suggest

    @property
    def suggested_reading(self) -> Reading | None:
        """The one format and column mapping that would read every file, for a client to apply with
        one click: only where every file needs it (the setting applies to all) and they agree."""
        if len(self.readings) != len(self.files) or len(set(self.readings)) != 1:
            return None
        return self.readings[0]

    @property
    def ok(self) -> bool:
        """Usable for training: rows to train on, no unusable file, and (when token lengths were
        measured) answers that survive truncation."""
        return self.rows_ok > 0 and not self.errors and not (self.token_stats and self.token_stats.teaches_nothing)

    def preview(self, n: int = 3) -> list[list[dict[str, str]]]:
        return self.conversations[:n]

    def dropped_by_reason(self) -> dict[str, list[RowIssue]]:
        groups: dict[str, list[RowIssue]] = {}
        for issue in self.dropped:
            groups.setdefault(issue.reason, []).append(issue)
        return dict(sorted(groups.items(), key=lambda kv: -len(kv[1])))

    def summary(self, problem: str | None = None) -> str:
        """A human-readable report: files and formats, rows ok/dropped by reason, token stats, errors, and
        the verdict (NOT OK with ``problem``, something found beyond the rows: a model, the cutoff)."""
        lines = [f"Format: {self.format or 'unknown'}"]
        lines += [f"  {note}" for note in self.notes]
        lines.append(f"Rows: {self.rows_total} read, {self.rows_ok} usable, {len(self.dropped)} dropped")
        if self.dropped:
            lines.append("Dropped rows by reason:")
            lines += [f"  - {line}" for line in describe_reasons(self.dropped)]
        if len(self.conversations) < self.rows_ok:
            lines.append(f"Using the first {len(self.conversations)} usable rows (max_samples={self.max_samples}).")
        stats = self.token_stats
        if stats:
            lines.append(stats.summary())
        if self.errors:
            lines.append("Unusable files:")
            lines += [f"  - {error}" for error in self.errors]
        problem = problem or (stats.problem() if stats and not self.errors and self.rows_ok else None)
        if problem:
            lines.append(f"NOT OK: {problem}")
        elif not self.ok:
            lines.append("NOT OK: fix the problems above.")
        elif stats and stats.warning():
            lines += [f"WARNING: {stats.warning()}", "OK: the data can be used for training (but see the warning)."]
        else:
            lines.append("OK: the data can be used for training.")
        return "\n".join(lines)

    def to_dict(self, include_conversations: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "ok": self.ok,
            "format": self.format,
            "files": [str(f) for f in self.files],
            "file_formats": self.file_formats,
            "notes": self.notes,
            "rows_total": self.rows_total,
            "rows_ok": self.rows_ok,
            "rows_used": len(self.conversations),
            "rows_dropped": len(self.dropped),
            "dropped_by_reason": {reason: len(items) for reason, items in self.dropped_by_reason().items()},
            "dropped": [issue.to_dict() for issue in self.dropped],
            "errors": self.errors,
            "token_stats": self.token_stats.__dict__ if self.token_stats else None,
            "preview": self.preview(3),
        }
        if include_conversations:
            data["conversations"] = self.conversations
        return data

    def compute_token_stats(self, tokenizer: Any, cutoff_len: int, template: str = "auto",
                            progress: Callable[[int, int], None] | None = None,
                            max_rows: int | None = None) -> TokenStats:
        """Tokenise the conversations with the chat template (untruncated) and record length stats;
        ``progress(done, total)`` as in ``tokenize_conversations``. ``max_rows``: measure at most that
        many, spread evenly over the dataset (the stats then say so)."""
        from sage_ft.data.tokenize import tokenize_conversations

        conversations = self.conversations
        if max_rows is not None and len(conversations) > max_rows:
            step = len(conversations) / max_rows
            conversations = [conversations[int(i * step)] for i in range(max_rows)]
        encoded = tokenize_conversations(conversations, tokenizer, _NO_CUTOFF, template, progress=progress)
        self.token_stats = token_stats_of(encoded, cutoff_len, len(self.conversations))
        return self.token_stats


def token_stats_of(encoded: list[dict[str, Any]], cutoff_len: int, rows: int | None = None) -> TokenStats:
    """``TokenStats`` of untruncated tokenised samples; ``rows``: how many the dataset has, when
    ``encoded`` is a sample of them."""
    from sage_ft.data.tokenize import has_trainable_token

    lengths = sorted(len(sample["input_ids"]) for sample in encoded)
    if not lengths:
        raise DataError("no conversation could be tokenised; check the model's chat template")
    return TokenStats(
        count=len(lengths), min=lengths[0], mean=sum(lengths) / len(lengths),
        p95=lengths[min(len(lengths) - 1, int(0.95 * len(lengths)))], max=lengths[-1],
        cutoff_len=cutoff_len, over_cutoff=sum(1 for n in lengths if n > cutoff_len),
        no_labels_after_cutoff=sum(1 for s in encoded if not has_trainable_token(s["labels"][:cutoff_len])),
        sampled_from=rows if rows is not None and rows > len(lengths) else None)


_NO_CUTOFF = 1_048_576  # TrainConfig's largest cutoff_len: lengths are measured untruncated


def describe_reasons(dropped: list[RowIssue]) -> list[str]:
    """``"empty response: 3 rows (a.jsonl line 4: 'output' is empty; line 9; ...)"`` per reason."""
    groups: dict[str, list[RowIssue]] = {}
    for issue in dropped:
        groups.setdefault(issue.reason, []).append(issue)
    lines = []
    for reason, issues in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = [f"{i.file.name} {i.location}" + (f": {i.detail}" if i.detail else "") for i in issues[:_SHOWN_LOCATIONS]]
        more = f"; and {len(issues) - _SHOWN_LOCATIONS} more" if len(issues) > _SHOWN_LOCATIONS else ""
        lines.append(f"{reason}: {len(issues)} row{'s' if len(issues) != 1 else ''} ({'; '.join(shown)}{more})")
    return lines


def split_paths(paths: str | Path | list[str | Path]) -> list[Path]:
    """A comma-separated string, one path, or a list of either -> a list of paths."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths or [])
    out: list[Path] = []
    for item in items:
        parts = item.split(",") if isinstance(item, str) else [item]
        out += [Path(str(p).strip()).expanduser() for p in parts if str(p).strip()]
    return out


def load_dataset(
    paths: str | Path | list[str | Path],
    fmt: str = "auto",
    column_mapping: str = "",
    max_samples: int | None = None,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    *,
    raise_on_error: bool = True,
    split: str = "train",
) -> DatasetReport:
    """Read, validate and merge dataset files (see the module docstring); ``paths`` may also name a
    folder, ``docs-sample``, a file in the data home or a cached Hub dataset (``sage_ft.data.sources``).

    ``fmt``: ``auto`` (detected per file from its first rows) or alpaca / sharegpt / openai.
    ``column_mapping``: ``"instruction=prompt,output=answer"`` style, see ``sage_ft.data.formats``.
    ``max_samples`` keeps the first N usable rows. ``max_bytes=None`` removes the size limit.
    With ``raise_on_error=False`` file-level problems go to ``report.errors`` instead of raising, so
    a UI can show them next to the rows of the good files; ``report.ok`` is then False.
    ``split``: which split a folder or Hub dataset means (``"train"``, or ``"eval"`` for eval data).
    """
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"format {fmt!r} is not known; choose one of auto, {', '.join(FORMATS)}")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"max_samples {max_samples} must be >= 1 (or empty for all rows)")
    try:
        mapping = parse_column_mapping(column_mapping)
    except MappingError as exc:
        raise DataError(str(exc)) from None
    from sage_ft.data.sources import dataset_files  # it reads this module's names

    entries = split_paths(paths)
    if not entries:
        raise DataError(f"no dataset file given; pass one or more {FILE_TYPES} files (comma separated)")
    report = DatasetReport(max_samples=max_samples)
    for entry in entries:  # a folder, a name or a Hub id: the files it means
        try:
            report.files += dataset_files(entry, report.notes, split)
        except DataError as exc:
            report.errors.append(str(exc))
    conversations: list[list[dict[str, str]]] = []
    for path in report.files:
        try:
            conversations += _load_file(path, fmt, mapping, max_bytes, report)
        except DataError as exc:
            report.errors.append(str(exc))
            if exc.reading is not None:
                report.readings.append(exc.reading)
    formats = sorted(set(report.file_formats.values()))
    report.format = formats[0] if len(formats) == 1 else ("mixed" if formats else fmt if fmt != "auto" else "")
    report.rows_ok = len(conversations)
    report.conversations = conversations[:max_samples] if max_samples else conversations
    if report.errors and raise_on_error:
        message = report.errors[0] if len(report.errors) == 1 else "\n".join(["Unusable dataset files:"] + report.errors)
        raise DataError(message, problems=list(report.errors), report=report, reading=report.suggested_reading)
    return report


def _load_file(path: Path, fmt: str, mapping: dict[str, str], max_bytes: int | None,
               report: DatasetReport) -> list[list[dict[str, str]]]:
    rows = list(read_rows(path, max_bytes))
    if not rows:
        raise DataError(f"{path}: the file has no rows (it is empty or only blank lines); "
                        "add at least one example or remove it from the list")
    if fmt == "auto":
        file_fmt, note = detect_format(path, rows, mapping)
    else:
        file_fmt, note = fmt, f"{path.name}: {fmt} (as set, not detected)"
    report.file_formats[str(path)] = file_fmt
    report.notes.append(note)
    report.rows_total += len(rows)
    conversations, dropped = [], []
    for location, row in rows:
        try:
            conversations.append(convert_row(row, file_fmt, mapping))
        except RowError as exc:
            dropped.append(RowIssue(path, location, exc.reason, exc.detail))
    report.dropped += dropped
    if not conversations:
        reasons = "\n  - ".join(describe_reasons(dropped))
        fix, reading = _all_dropped_fix(dropped, rows, file_fmt, mapping)
        raise DataError(f"{path}: 0 usable rows out of {len(rows)} (read as {file_fmt}). Every row was dropped:\n"
                        f"  - {reasons}\n{fix}", reading=reading)
    return conversations


def _all_dropped_fix(dropped: list[RowIssue], rows: list[tuple[str, Any]], fmt: str,
                     mapping: dict[str, str]) -> tuple[str, Reading | None]:
    """What to do when every row of a file was dropped, and the reading that would do it: tool-calling
    rows are said to be unsupported; rows missing their fields get a column mapping built from their
    own keys; else fix the rows."""
    reasons = {issue.reason for issue in dropped}
    if TOOL_CALLS_REASON in reasons:
        return f"Note: {TOOL_CALLS_HELP}.", None
    if any(reason.startswith(("missing field", "unknown role", "no messages")) for reason in reasons):
        reading = suggest_reading(row for _, row in rows[:DETECT_ROWS])
        current = Reading(fmt, ",".join(f"{k}={v}" for k, v in mapping.items()))
        if reading is not None and reading != current:
            return f"To read these rows: {reading.how()}.", reading
        return f"Fix the rows, or name their keys: {GENERIC_READING.how()}.", None
    return "Fix the rows listed above.", None


def detect_format(path: Path, rows: list[tuple[str, Any]], mapping: dict[str, str]) -> tuple[str, str]:
    """The format most of the first ``DETECT_ROWS`` rows look like, and a note saying so."""
    head = rows[:DETECT_ROWS]
    votes = Counter(f for f in (detect_row_format(row, mapping) for _, row in head) if f)
    if not any(isinstance(row, dict) for _, row in head):
        location, row = head[0]
        raise DataError(f"{path}: {location} is {type(row).__name__}, not a JSON object; every row must be an "
                        'object such as {"instruction": "...", "output": "..."} or {"messages": [...]}')
    if not votes:
        first = next((row for _, row in head if isinstance(row, dict)), None)
        keys = ", ".join(map(str, list(first)[:10])) if first else "no JSON objects"
        reading = suggest_reading(row for _, row in head)
        fix = (f"these rows look like {reading.fmt} under other key names: {reading.how()}" if reading
               else f"name the keys that hold each part: {GENERIC_READING.how()}")
        raise DataError(
            f"{path}: cannot tell the dataset format from the first {len(head)} rows ({head[0][0]} has keys: "
            f"{keys}). Expected alpaca (instruction, output), sharegpt (conversations) or openai (messages); {fix}",
            reading=reading)
    fmt, count = votes.most_common(1)[0]
    return fmt, f"{path.name}: {fmt} (auto-detected from {count} of the first {len(head)} rows)"


def read_rows(path: Path, max_bytes: int | None = DEFAULT_MAX_BYTES) -> Iterator[tuple[str, Any]]:
    """``(location, row)`` for every row of a dataset file (``SUFFIXES``), after the file checks: the
    parsed JSON value of a .json/.jsonl row, a ``{column: value}`` object of a .csv/.tsv/.parquet row."""
    check_file(path, max_bytes)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif suffix == ".parquet":
        yield from _read_parquet_file(path)
    elif suffix in DELIMITERS:
        yield from _read_table_file(path, DELIMITERS[suffix])
    else:
        yield from _read_json_array(path)


def check_file(path: Path, max_bytes: int | None) -> None:
    """Existence, extension, size and binary checks that need at most the first 8 KiB."""
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise DataError(f"{str(path)[:120]}...: not a usable file path ({exc.strerror}); check the path") from None
    if not exists:
        raise DataError(f"{path}: file not found (working directory: {Path.cwd()}); check the path")
    if not path.is_file():
        what = "a directory" if path.is_dir() else "not a regular file"
        raise DataError(f"{path}: is {what}, not a dataset file; pass the {FILE_TYPES} files themselves")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        hint = _CONVERT_HINTS.get(suffix, "save it as JSON Lines (one JSON object per line) with a .jsonl name")
        raise DataError(f"{path}: unsupported file type {suffix or '(no extension)'!r}; only .json (an array of "
                        "objects), .jsonl (one object per line), .csv and .tsv (a header row, then one row per "
                        f"example) and .parquet are read. To use it, {hint}")
    size = path.stat().st_size
    if max_bytes is not None and size > max_bytes:
        raise DataError(
            f"{path}: the file is {_human(size)}, over the {_human(max_bytes)} limit for one dataset file. "
            "Split it or keep the rows you need; or raise the limit (max_bytes= in Python, --max-bytes in "
            "`sage-ft check-data`, or the SAGE_FT_MAX_DATASET_BYTES environment variable)")
    with path.open("rb") as fh:
        head = fh.read(8192)
    if suffix == ".parquet":
        if not head.startswith(parquet.MAGIC):
            empty = ", it is empty" if not head else ""
            raise DataError(f"{path}: not a Parquet file (it does not start with {parquet.MAGIC.decode()}{empty}); "
                            f"was a file of another type renamed to .parquet? Give it its own extension ({FILE_TYPES})")
        return
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            raise DataError(f"{path}: this is {what} (binary, not text) — was it renamed to {suffix}?")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path}: the file is UTF-16 text; re-save it as UTF-8 (e.g. iconv -f UTF-16 -t UTF-8)")
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head[:nul].count(b"\n") + 1
        raise DataError(f"{path}: binary data (a NUL byte at byte offset {nul}, line {line}); "
                        f"this is not text — was a binary file renamed to {suffix}? Export the data as JSON Lines or CSV")


def _read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as fh:
        offset, lineno = 0, 0
        while True:
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise DataError(
                    f"{path}: line {lineno} is longer than {_human(MAX_LINE_BYTES)} (stopped reading there); one "
                    "JSON Lines row must be a single training example. Split it, or if it is one big JSON "
                    "array save the file as .json")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(_not_utf8(path, exc, offset + exc.start, lineno)) from None
            if lineno == 1:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            if not text.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                hint = ("the file looks like one JSON array: rename it to .json" if lineno == 1
                        and text.lstrip().startswith("[") and not text.rstrip().endswith("]")
                        else f"fix or delete line {lineno}: each line must be one complete JSON object")
                raise DataError(f"{path}: line {lineno}, column {exc.colno}: invalid JSON ({exc.msg}); {hint}") from None


def _read_text(path: Path) -> str:
    """The whole file as text, without the byte-order mark spreadsheets write in "CSV UTF-8"."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise DataError(_not_utf8(path, exc, exc.start, data[: exc.start].count(b"\n") + 1)) from None


def _read_table_file(path: Path, delimiter: str) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    try:
        yield from read_table(text, delimiter, MAX_LINE_BYTES)
    except TableError as exc:
        raise DataError(f"{path}: line {exc.line}: {exc}") from None


def _read_parquet_file(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        yield from parquet.read_parquet(path)
    except parquet.ParquetError as exc:
        raise DataError(f"{path}: {exc}") from None


def _read_json_array(path: Path) -> Iterator[tuple[str, Any]]:
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "fix the JSON at that place"
        if exc.msg.startswith("Extra data") and exc.lineno > 1:
            hint = "the file looks like JSON Lines (one object per line): rename it to .jsonl"
        raise DataError(f"{path}: line {exc.lineno}, column {exc.colno}: invalid JSON ({exc.msg}); {hint}") from None
    if isinstance(value, dict):
        inner = [k for k, v in value.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
        hint = (f"the rows seem to be under the key {inner[0]!r}: save that array alone" if inner
                else "wrap the rows in [ ... ] or write one object per line as .jsonl")
        raise DataError(f"{path}: the top-level JSON value is an object; a .json dataset must be an array of "
                        f"objects [{{...}}, {{...}}]; {hint}")
    if not isinstance(value, list):
        raise DataError(f"{path}: the top-level JSON value is {type(value).__name__}; a .json dataset must be an "
                        "array of objects [{...}, {...}]")
    for index, row in enumerate(value):
        yield f"index {index}", row


def _not_utf8(path: Path, exc: UnicodeDecodeError, offset: int, lineno: int) -> str:
    byte = exc.object[exc.start: exc.start + 1].hex().upper()
    return (f"{path}: line {lineno} (byte offset {offset}): not UTF-8 text (byte 0x{byte}: {exc.reason}); "
            "re-save the file as UTF-8, e.g. iconv -f latin1 -t utf-8 IN > OUT")


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
