"""``sage-ft``: the command-line client of the same core API the web UI uses.

Each command group lives in its own module with a ``register(subparsers)`` function, so adding a
command never touches another group's code. Handlers import heavy libraries lazily.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from sage_ft.paths import DataHomeUnavailable

# module name -> the commands it registers (documentation only; register() is the truth)
COMMAND_MODULES = {
    "train": ("train", "demo-model"),
    "data": ("check-data", "prepare-docs"),
    "tasks": ("tasks",),
    "models": ("models", "gpu"),
    "serve": ("serve", "chat", "switch"),
    "export": ("export",),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sage-ft", description="SAGE Fine-Tune Studio: LoRA fine-tuning, live monitoring and vLLM chat."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        importlib.import_module(f"sage_ft.cli.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The terminal's handler has its own level: a training run raises sage_ft's loggers to INFO for its
    # logs.txt, and its INFO lines would otherwise reach the terminal beside the CLI's own progress lines.
    terminal = logging.StreamHandler()
    terminal.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, handlers=[terminal])
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    from sage_ft.serving.ports import bypass_proxies_for_loopback

    bypass_proxies_for_loopback()  # the chat server is on loopback: never reach it through a proxy
    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is caught below rather than at exit
        return code
    except DataHomeUnavailable as exc:  # whichever command touched the data home first
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sage-ft tasks list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
