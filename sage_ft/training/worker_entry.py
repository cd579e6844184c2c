"""One rank of a data-parallel run: ``python -m sage_ft.training.worker_entry CONFIG.yaml``.

Started by ``accelerate launch`` (see ``launcher``), once per rank. Rank 0 runs ``FineTuneRun`` on
the real run directory (events, meta, logs, adapter). Other ranks take part in every step but keep
their bookkeeping in a scratch folder ``<run>/.rank-N`` that is removed at the end, because
``FineTuneRun`` writes its files from every process it runs in.

Cancel: each rank watches ``<run>/CANCEL`` and also treats SIGTERM as a cancel request; the trainer
stops between steps, so ranks that see the request at the same step stop together. The launcher
escalates to killing the process group when they do not (``MultiProcessRun.cancel``).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from sage_ft.config import ConfigError, TrainConfig
from sage_ft.training.launcher import CANCEL_FILE

POLL_S = 0.5


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)


def _watch_cancel(run, cancel_file: Path, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        if cancel_file.exists():
            run.cancel()
            return


def _announce_world(emitter) -> None:
    """Record in the run's events how many processes train together (the process group exists by now)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        emitter.emit("log", level="info", world_size=dist.get_world_size(), backend=str(dist.get_backend()),
                     message=f"data-parallel run: {dist.get_world_size()} processes, {dist.get_backend()} backend")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m sage_ft.training.worker_entry CONFIG.yaml", file=sys.stderr)
        return 2
    try:
        config, _ = TrainConfig.from_yaml(argv[0])
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    from sage_ft.events import EventEmitter
    from sage_ft.training import FineTuneRun

    run_dir = Path(config.output_dir)
    me = rank()
    scratch = None
    if me == 0:
        emitter = EventEmitter(run_dir / "events.jsonl")
        emitter.on("training_start", lambda _event: _announce_world(emitter))
        run = FineTuneRun(config, emitter=emitter)
    else:
        scratch = run_dir / f".rank-{me}"
        config = dataclasses.replace(config, output_dir=str(scratch), overwrite_output_dir=True)
        run = FineTuneRun(config, emitter=EventEmitter(None))
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_cancel, args=(run, run_dir / CANCEL_FILE, stop), daemon=True)
    watcher.start()
    signal.signal(signal.SIGTERM, lambda *_: run.cancel())
    try:
        result = run.run()
    finally:
        stop.set()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    if result.error:
        print(f"rank {me}: {result.status}: {result.error}", file=sys.stderr)
    return 0 if result.status in ("completed", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
