"""CLI commands ``check-data`` and ``prepare-docs`` (thin wrappers over ``sage_ft.data``).

Exit codes: 0 = the data can be used / the dataset was written; 1 = it cannot (the reason goes to
stderr, never a stack trace).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sage_ft.config import TrainConfig
from sage_ft.data.formats import ALPACA_KEYS, CHAT_KEYS, FORMATS
from sage_ft.data.load import FILE_TYPES

MAPPING_HELP = (
    "Which keys of your rows hold each field, as field=key pairs separated by commas. "
    f"alpaca fields: {', '.join(ALPACA_KEYS)} (history = list of [user, assistant] pairs); "
    f"sharegpt/openai fields: {', '.join(CHAT_KEYS)}. "
    "Example: --column-mapping 'instruction=question,output=answer' or 'messages=dialog,role=speaker,"
    "content=text,user_tag=Q,assistant_tag=A'."
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's commands to the `sage-ft` parser."""
    check = sub.add_parser(
        "check-data", help="validate dataset files and print a report (exit 1 if they cannot be used)",
        description=f"Read {FILE_TYPES} dataset files the way training will, and report rows usable and "
                    "dropped (with file, line/index and reason); with --model also token length statistics.")
    check.add_argument("files", nargs="+", metavar="FILE",
                       help=".json (array of objects), .jsonl (one object per line), .csv or .tsv (header row) or "
                            ".parquet files; a folder (its train split), 'docs-sample', a name in the data home, or a "
                            "Hugging Face dataset id in the local cache")
    check.add_argument("--format", default="auto", choices=("auto", *FORMATS),
                       help="dataset layout (default: auto-detect per file)")
    check.add_argument("--column-mapping", default="", metavar="M", help=MAPPING_HELP)
    check.add_argument("--max-samples", type=int, default=None, metavar="N", help="use only the first N usable rows")
    check.add_argument("--max-bytes", type=int, default=None, metavar="N",
                       help="refuse files larger than N bytes (default: 512 MiB or $SAGE_FT_MAX_DATASET_BYTES)")
    check.add_argument("--model", default=None, metavar="M",
                       help="also tokenise with this model's chat template ('demo', a directory or a hub id)")
    check.add_argument("--cutoff-len", type=int, default=TrainConfig().cutoff_len, metavar="N",
                       help="token limit per sample used for the length report (default: %(default)s)")
    check.add_argument("--template", default="auto", choices=TrainConfig.ui("template").choices,
                       help="chat template for --model (default: the model's own)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--show", type=int, default=0, metavar="N", help="also print the first N conversations")
    check.set_defaults(handler=check_data)

    docs = sub.add_parser(
        "prepare-docs", help="turn a folder of Markdown/text documents into a training .jsonl",
        description="Builds section-title -> section-body QA pairs and paragraph continuation samples "
                    "(OpenAI messages format), deterministically and offline.")
    docs.add_argument("src", nargs="?", metavar="DIR", help="folder (or file) of .md/.markdown/.txt documents")
    docs.add_argument("-o", "--output", metavar="OUT.jsonl",
                      help="where to write (default: <data home>/datasets/<DIR name>-docs.jsonl)")
    docs.add_argument("--builtin", action="store_true",
                      help="(re)build the built-in sample from sage-ft's own docs and print its path")
    docs.add_argument("--overwrite", action="store_true", help="replace OUT.jsonl when it exists already")
    docs.add_argument("--max-answer-chars", type=int, default=1500, metavar="N",
                      help="split longer section bodies into parts (default: %(default)s)")
    docs.set_defaults(handler=prepare_docs_command)


def check_data(args: argparse.Namespace) -> int:
    from sage_ft.data.load import DEFAULT_MAX_BYTES, DataError, load_dataset

    shortest = int(TrainConfig.ui("cutoff_len").min or 1)
    if args.cutoff_len < shortest:
        return _fail(f"--cutoff-len {args.cutoff_len}: training needs at least {shortest} tokens per sample")
    try:
        report = load_dataset(args.files, fmt=args.format, column_mapping=args.column_mapping,
                              max_samples=args.max_samples,
                              max_bytes=args.max_bytes if args.max_bytes is not None else DEFAULT_MAX_BYTES,
                              raise_on_error=False)
    except DataError as exc:
        return _fail(str(exc))
    model_error = None
    if args.model and report.conversations:
        try:
            _token_stats(report, args.model, args.cutoff_len, args.template)
        except Exception as exc:  # a model/tokenizer problem is reported, never a stack trace
            model_error = f"--model {args.model}: {exc}"
    # Decided before the report is printed, so that its verdict says it (it said "OK" above the error).
    stats = report.token_stats
    problem = model_error or (stats.problem() if stats else None)
    if args.json:
        data = report.to_dict()
        data.update(ok=report.ok and not problem, model_error=model_error, problem=problem,
                    warning=stats.warning() if stats else None)
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print(report.summary(problem))
        for i, conversation in enumerate(report.preview(args.show)):
            print(f"\n--- conversation {i + 1} ---")
            for message in conversation:
                print(f"[{message['role']}] {message['content']}")
    if report.errors or not report.rows_ok:
        return _fail("\n".join(report.errors) or "no usable rows")
    return _fail(problem) if problem else 0


def _token_stats(report, model: str, cutoff_len: int, template: str) -> None:
    from sage_ft.models.resolve import resolve_model

    model_dir = resolve_model(model)  # fails fast, before the slow transformers import
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    last_line = [float("-inf")]  # the first chunk says it at once, then every 5 s

    def say_how_far(done: int, total: int) -> None:  # on stderr: --json keeps stdout clean
        if done < total and time.monotonic() - last_line[0] >= 5:
            last_line[0] = time.monotonic()
            print(f"tokenizing {done:,}/{total:,} conversations", file=sys.stderr, flush=True)

    report.compute_token_stats(tokenizer, cutoff_len, template, progress=say_how_far)


def prepare_docs_command(args: argparse.Namespace) -> int:
    from sage_ft import paths
    from sage_ft.atomic import output_path_problem
    from sage_ft.data.docs import prepare_docs
    from sage_ft.data.load import DataError
    from sage_ft.data.sample import builtin_sample_dataset

    try:
        if args.builtin:
            print(builtin_sample_dataset(force=True))
            return 0
        if not args.src:
            return _fail("prepare-docs: give a folder of documents (DIR) or --builtin")
        src = Path(args.src)
        out = Path(args.output) if args.output else paths.datasets_dir() / f"{src.resolve().name}-docs.jsonl"
        problem = output_path_problem(out)
        if problem is not None:
            return _fail(f"cannot write there: {problem}; choose another -o")
        if out.exists() and not args.overwrite:  # it may be a dataset of the user's own
            return _fail(f"{out} exists already; pass --overwrite to replace it, or choose another -o")
        result = prepare_docs(src, out, max_answer_chars=args.max_answer_chars)
    except DataError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"cannot write {exc.filename}: {exc.strerror}")
    print(f"Wrote {result.count} samples ({result.qa_pairs} section QA pairs, {result.continuations} "
          f"continuations) from {_count(len(result.sources), 'document')} to {result.path}")
    if result.skipped:  # found but not used: named with the reason, after the count they are not part of
        print(f"Skipped {_count(len(result.skipped), 'document')}:")
        for line in result.skipped:
            print(f"  - {line}")
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
