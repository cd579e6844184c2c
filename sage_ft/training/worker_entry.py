"""One rank of a data-parallel run: ``python -m sage_ft.training.worker_entry CONFIG.yaml``.

Started by ``accelerate launch`` (see ``launcher``), once per rank. Every rank runs ``FineTuneRun``
on the same run directory: all ranks read checkpoints from it (so ``resume_from_checkpoint: last``
resumes every rank from the same step), and only rank 0 writes the run's files (events, meta, logs,
adapter) — ``FineTuneRun`` knows its rank.

Cancel: rank 0 watches ``<run>/CANCEL``; any rank also treats SIGTERM as a cancel request. The
trainer all-reduces the cancel flag after every step, so all ranks stop together at the same step.
The launcher escalates to killing the process group when they do not (``MultiProcessRun.cancel``).
A rank whose launcher died (it is re-parented) stops the same way and exits at the latest
``ORPHAN_EXIT_S`` later: nobody supervises it any more (the app also ends the ranks it finds left,
from the records each rank writes under ``<run>/ranks/``).
Each rank prints one line at the end: ``rank N: <status> at step S (resumed from <checkpoint>)``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from sage_ft.config import ConfigError, TrainConfig
from sage_ft.training.launcher import CANCEL_FILE, RANKS_DIR

POLL_S = 0.5
ORPHAN_EXIT_S = 60.0


def _watch_cancel(run, cancel_file: Path, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        if cancel_file.exists():
            run.cancel()
            return


def _watch_launcher(run, launcher_pid: int, stop: threading.Event) -> None:
    while not stop.wait(POLL_S):
        if os.getppid() != launcher_pid:
            print(f"rank {os.environ.get('RANK', '0')}: the launcher (pid {launcher_pid}) is gone; stopping",
                  file=sys.stderr, flush=True)
            run.cancel()
            if not stop.wait(ORPHAN_EXIT_S):
                os._exit(3)
            return


def _record_self(output_dir: Path, rank: int) -> None:
    """Write ``ranks/rank-N.json`` (pid + start time): the launcher ends leftover ranks from these."""
    import json

    from sage_ft.tasks.procinfo import current_identity

    folder = output_dir / RANKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    me = current_identity()
    record = {"pid": me.pid, "start_time": me.start_time, "rank": rank}
    (folder / f"rank-{rank}.json").write_text(json.dumps(record), encoding="utf-8")


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
    from sage_ft.training import FineTuneRun

    me = int(os.environ.get("RANK", "0") or 0)
    _record_self(Path(config.output_dir), me)
    run = FineTuneRun(config)
    stop = threading.Event()
    if run.is_main_process:
        run.emitter.on("training_start", lambda _event: _announce_world(run.emitter))
        threading.Thread(target=_watch_cancel, args=(run, Path(config.output_dir) / CANCEL_FILE, stop),
                         daemon=True).start()
    threading.Thread(target=_watch_launcher, args=(run, os.getppid(), stop), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: run.cancel())
    try:
        result = run.run()
    finally:
        stop.set()
    step = result.metrics.get("global_step")
    resumed = f" (resumed from {Path(run.resumed_from).name})" if run.resumed_from else ""
    print(f"rank {me}: {result.status} at step {step}{resumed}" + (f": {result.error}" if result.error else ""),
          file=sys.stderr, flush=True)
    return 0 if result.status in ("completed", "cancelled") else 1


if __name__ == "__main__":
    sys.exit(main())
