"""Documents -> training set: turn Markdown / plain-text files into OpenAI-messages JSON Lines.

Two kinds of samples, both deterministic (same files in, same bytes out) and fully offline:

- section QA: for each section (a Markdown heading and the text under it) the user asks
  "What does the documentation say about <title>?" and the assistant answers with the section body.
  Long bodies are split at paragraph boundaries into parts of at most ``max_answer_chars``; titles
  that occur more than once are qualified with their document's title.
- continuation: for each prose paragraph of at least ``min_continuation_words`` words, the user
  gives the first half and the assistant writes the rest.

Sections with no text are skipped. Files that cannot be read as UTF-8 are skipped and listed in the
result; if nothing usable is left, ``DataError`` says why.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sage_ft.atomic import atomic_writer
from sage_ft.data.load import DataError

DOC_SUFFIXES = (".md", ".markdown", ".txt")
QUESTION = "What does the documentation say about {title}?"

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")


@dataclass
class Section:
    title: str
    body: str
    doc_title: str
    source: Path


@dataclass
class DocsDatasetResult:
    """``count`` samples written to ``path`` (``qa_pairs`` + ``continuations``)."""

    count: int
    path: Path
    qa_pairs: int = 0
    continuations: int = 0
    sources: list[Path] = field(default_factory=list)  # the documents the samples came from
    skipped: list[str] = field(default_factory=list)  # "file: why" for each document found but not used


def find_documents(src: str | Path | list[str | Path]) -> list[Path]:
    """Document files under ``src``: files given directly, and Markdown/text files found (recursively,
    sorted, hidden folders ignored) in the directories given."""
    items = [src] if isinstance(src, (str, Path)) else list(src)
    found: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(item).parts))
        elif item.is_file():
            found.append(item)
        else:
            raise DataError(f"{item}: not found; give a folder of .md/.txt documents (or the files themselves)")
    return found


def split_sections(text: str, source: Path) -> list[Section]:
    """Sections of one document. Text before the first heading belongs to the document title."""
    lines = text.replace("\r\n", "\n").split("\n")
    headings: list[tuple[int, int, str]] = []  # (line index where the heading starts, body start, title)
    in_fence = False
    for i, line in enumerate(lines):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        atx = _ATX.match(line)
        if atx and atx.group(2):
            headings.append((i, i + 1, atx.group(2)))
        elif (_SETEXT.match(line) and i > 0 and lines[i - 1].strip() and not _ATX.match(lines[i - 1])
              and (i == 1 or not lines[i - 2].strip()) and not lines[i - 1].lstrip().startswith(("-", "*", "|"))):
            headings.append((i - 1, i + 1, lines[i - 1].strip()))
    doc_title = next((t for start, _, t in headings if lines[start].lstrip().startswith("# ")), None)
    doc_title = _plain(doc_title) if doc_title else source.stem.replace("_", " ").replace("-", " ")
    sections = []
    bounds = [(0, 0, doc_title)] + headings
    for n, (_, body_start, title) in enumerate(bounds):
        body_end = bounds[n + 1][0] if n + 1 < len(bounds) else len(lines)
        body = "\n".join(lines[body_start:body_end]).strip()
        if body:
            sections.append(Section(_plain(title), body, doc_title, source))
    return sections


def _plain(title: str) -> str:
    """Heading text without Markdown emphasis/code/link syntax."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[`*_]", "", title).strip()


def paragraphs(body: str) -> list[str]:
    """Blank-line separated blocks, code fences kept whole."""
    blocks, current, in_fence = [], [], False
    for line in body.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
        if not line.strip() and not in_fence:
            if current:
                blocks.append("\n".join(current))
            current = []
        else:
            current.append(line)
    if current:
        blocks.append("\n".join(current))
    return blocks


def _is_prose(block: str) -> bool:
    first = block.lstrip()
    return not (first.startswith(("```", "~~~", "|", "#", "<", ">", "    ")) or _SETEXT.match(first))


def chunk_body(body: str, max_chars: int) -> list[str]:
    """Split at paragraph boundaries into parts of at most ``max_chars`` (a longer paragraph stays whole)."""
    parts, current = [], ""
    for block in paragraphs(body):
        if current and len(current) + 2 + len(block) > max_chars:
            parts.append(current)
            current = block
        else:
            current = f"{current}\n\n{block}" if current else block
    if current:
        parts.append(current)
    return parts


def continuation_pair(block: str, min_words: int) -> tuple[str, str] | None:
    """(first half, rest) of a prose paragraph split at the middle word, or None if too short."""
    if not _is_prose(block):
        return None
    words = list(re.finditer(r"\S+", block))
    if len(words) < min_words:
        return None
    cut = words[len(words) // 2].start()
    head, tail = block[:cut].rstrip(), block[cut:].strip()
    return (head, tail) if head and tail else None


def build_samples(sections: list[Section], max_answer_chars: int = 1500,
                  min_continuation_words: int = 12) -> tuple[list[dict], int, int]:
    """The training rows (OpenAI messages) for these sections, and how many of each kind."""
    title_count: dict[str, int] = {}
    for s in sections:
        title_count[s.title.lower()] = title_count.get(s.title.lower(), 0) + 1
    rows: list[dict] = []
    qa = cont = 0
    for s in sections:
        title = s.title if title_count[s.title.lower()] == 1 or s.title == s.doc_title else f"{s.title} ({s.doc_title})"
        chunks = chunk_body(s.body, max_answer_chars)
        for k, chunk in enumerate(chunks):
            label = title if len(chunks) == 1 else f"{title} (part {k + 1} of {len(chunks)})"
            rows.append(_row(QUESTION.format(title=label), chunk))
            qa += 1
        for block in paragraphs(s.body):
            pair = continuation_pair(block, min_continuation_words)
            if pair:
                rows.append(_row(*pair))
                cont += 1
    return rows, qa, cont


def _row(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def prepare_docs(src_dir: str | Path | list[str | Path], out_path: str | Path, *, max_answer_chars: int = 1500,
                 min_continuation_words: int = 12) -> DocsDatasetResult:
    """Write a training .jsonl (OpenAI messages) built from the documents in ``src_dir``.

    ``src_dir`` is a folder (searched recursively for .md/.markdown/.txt), a file, or a list of
    either. The output is written atomically (temp file + rename), so readers never see half a file.
    """
    out_path = Path(out_path)
    if isinstance(src_dir, (str, Path)) and not Path(src_dir).exists():
        raise DataError(f"{src_dir}: folder not found; give a folder of .md/.txt documents")
    sources = find_documents(src_dir)
    if not sources:
        raise DataError(f"{src_dir}: no .md, .markdown or .txt documents found; put your documents there")
    sections: list[Section] = []
    skipped: list[str] = []
    used: list[Path] = []  # only these count as the documents the samples came from (skipped ones did too)
    for source in sources:
        try:
            text = source.read_text(encoding="utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as exc:
            skipped.append(f"{source}: not UTF-8 (byte offset {exc.start}); re-save it as UTF-8")
            continue
        except OSError as exc:
            skipped.append(f"{source}: cannot be read ({exc.strerror})")
            continue
        found = split_sections(text, source)
        if not found:
            skipped.append(f"{source}: no text (the file is empty or has only headings)")
            continue
        used.append(source)
        sections += found
    rows, qa, cont = build_samples(sections, max_answer_chars, min_continuation_words)
    if not rows:
        why = "; ".join(skipped) if skipped else "every document is empty"
        raise DataError(f"{src_dir}: no text to learn from in {len(sources)} document(s): {why}")
    _write_jsonl_atomic(rows, out_path)
    return DocsDatasetResult(len(rows), out_path, qa, cont, used, skipped)


def _write_jsonl_atomic(rows: list[dict], path: Path) -> None:
    with atomic_writer(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
