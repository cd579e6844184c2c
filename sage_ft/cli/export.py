"""``sage-ft export``: merge a fine-tune into its base model (and optionally write a GGUF) from the shell.

Same core calls as the web UI's Export tab; progress goes to stderr, the output path to stdout (so
``$(sage-ft export 3)`` captures it), and a refusal is one clear line with exit status 1.
"""

from __future__ import annotations

import argparse
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    """Add this group's commands to the `sage-ft` parser."""
    from sage_ft.export.gguf_export import GGUF_OUTTYPES
    from sage_ft.export.merge import DEFAULT_SHARD_SIZE, DTYPES

    p = sub.add_parser("export", help="merge a run's LoRA into its base model (safetensors, optional GGUF)",
                       description="Merge the LoRA adapter of a task / run directory / checkpoint-N directory "
                                   "into its base model and write a standalone model, verified against "
                                   "base + adapter.")
    p.add_argument("source", metavar="TASK_ID_OR_RUN_DIR",
                   help="a task id or name, a run directory, one of its checkpoint-N directories, or an adapter directory")
    p.add_argument("--out", metavar="DIR", help="output directory (default: <data home>/exports/<run>-merged)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype (default: the base model's)")
    p.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, metavar="SIZE",
                   help=f"largest safetensors shard, e.g. 500MB (default {DEFAULT_SHARD_SIZE})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export at the target")
    p.add_argument("--gguf", choices=GGUF_OUTTYPES, metavar="TYPE",
                   help=f"also write a GGUF file ({', '.join(GGUF_OUTTYPES)}; Llama/Qwen2 models)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip comparing the exported model's logits with the source")
    p.add_argument("--zip", action="store_true", help="also pack the export into <out>.zip")
    p.set_defaults(handler=run_export)


class _Progress:
    """Prints a stage when it starts and then at most every 10 %, so GGUF's per-tensor steps stay short."""

    def __init__(self) -> None:
        self._last: tuple[str, float] = ("", -1.0)

    def __call__(self, stage: str, fraction: float) -> None:
        last_stage, last_fraction = self._last
        if stage != last_stage or fraction - last_fraction >= 0.1 or fraction >= 1.0:
            print(f"[{fraction:4.0%}] {stage}", file=sys.stderr, flush=True)
            self._last = (stage, fraction)


def _print_verify(label: str, result) -> None:
    if result is None:
        print(f"{label}: not verified", file=sys.stderr)
        return
    state = "ok" if result.ok else "FAILED"
    print(f"{label}: {state} (max |logit diff| {result.max_abs_diff:.3g}, tolerance "
          f"{result.details.get('atol', float('nan')):.3g}, top-1 agreement "
          f"{result.details.get('top1_agreement', 0.0):.0%})", file=sys.stderr)


def run_export(args: argparse.Namespace) -> int:
    from sage_ft.export import ExportError, convert_to_gguf, merge_lora, zip_export
    from sage_ft.export.source import run_dir_for

    started = time.monotonic()
    parts: dict[str, float] = {}  # merge / GGUF / zip -> seconds, for the closing line
    try:
        source = run_dir_for(args.source)
        result = merge_lora(source, out_dir=args.out, dtype=args.dtype, shard_size=args.shard_size,
                            overwrite=args.overwrite, progress=_Progress(), verify=args.verify)
        parts["merge"] = time.monotonic() - started
        _print_verify("verify merge", result.verify)
        if result.verify is not None and not result.verify.ok:
            print(f"error: the merged model in {result.out_dir} does not match base + adapter; do not use it",
                  file=sys.stderr)
            return 1
        print(f"merged model ({result.dtype}, {len(result.weight_files)} weight file(s), "
              f"{result.size_bytes / 1e6:.1f} MB): {result.out_dir}", file=sys.stderr)
        outputs = [result.out_dir]
        if args.gguf:
            t0 = time.monotonic()
            gguf = convert_to_gguf(result.out_dir, outtype=args.gguf, verify=args.verify,
                                   overwrite=args.overwrite, progress=_Progress())
            parts["GGUF"] = time.monotonic() - t0
            _print_verify("verify gguf", gguf.verify)
            print(f"GGUF ({gguf.outtype}, {gguf.size_bytes / 1e6:.1f} MB): {gguf.path}", file=sys.stderr)
            outputs.append(gguf.path)
        if args.zip:
            t0 = time.monotonic()
            outputs.append(zip_export(result.out_dir))
            parts["zip"] = time.monotonic() - t0
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    detail = f" ({', '.join(f'{part} {seconds:.1f} s' for part, seconds in parts.items())})" if len(parts) > 1 else ""
    print(f"exported in {time.monotonic() - started:.1f} s{detail}", file=sys.stderr)
    for path in outputs:
        print(path)
    return 0
