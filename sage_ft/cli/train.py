"""``sage-ft train`` and ``sage-ft demo-model``: a thin shell around ``TaskManager.run_foreground``.

The run is registered in the shared task store (source ``cli``), so a running web UI lists it,
follows it and can cancel or pause it, and ``sage-ft tasks`` sees it. This module only parses,
validates the dataset up front (a bad dataset never starts a run), prints one progress line per
logging step and maps the outcome to an exit code: 0 completed, 1 failed, 2 bad config, 130
cancelled (Ctrl-C: the first one cancels cleanly and saves the adapter, a second one aborts and
leaves the task interrupted, resumable). The last line printed is the run's output directory.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_CANCELLED = 0, 1, 2, 130


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``demo-model`` to the ``sage-ft`` parser."""
    p = sub.add_parser("train", help="fine-tune a model with LoRA from a YAML config",
                       description="Fine-tune with LoRA. Precedence: defaults < CONFIG.yaml < --set key=value.")
    p.add_argument("config", nargs="?", help="YAML config (LLaMA-Factory style keys accepted)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable), e.g. --set learning_rate=1e-4")
    p.add_argument("--help-config", action="store_true", help="list every config key with default and help")
    p.set_defaults(handler=train_command)

    d = sub.add_parser("demo-model", help="build the built-in tiny demo model and print its path")
    d.add_argument("--force", action="store_true", help="rebuild even if it exists")
    d.add_argument("--path", help="where to build it (default: the data home's models/)")
    d.set_defaults(handler=demo_model_command)


def demo_model_command(args: argparse.Namespace) -> int:
    from sage_ft.models.demo import build_demo_model

    print(build_demo_model(args.path, force=args.force))
    return EXIT_OK


def train_command(args: argparse.Namespace) -> int:
    from sage_ft.config import ConfigError, TrainConfig, describe_fields, unknown_key_warning

    if args.help_config:
        print(describe_fields())
        return EXIT_OK
    try:
        if args.config:
            config, unknown = TrainConfig.from_yaml(args.config, args.overrides)
        else:
            config, unknown = TrainConfig.from_overrides(args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for key in unknown:
        print(f"warning: {unknown_key_warning(key)}", file=sys.stderr)

    if not check_dataset(config):
        return EXIT_FAILED
    from sage_ft.tasks import TaskManager, TaskRefused
    from sage_ft.tasks.store import StoreUnavailable

    try:
        manager = TaskManager(start_worker=False)
    except StoreUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    control = _ForegroundControl(manager)
    previous = control.install()
    try:
        result = manager.run_foreground(config, on_event=_print_event, on_start=control.started)
    except TaskRefused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:  # a second Ctrl-C: the task is left interrupted (resumable)
        hint = f"; resume with `sage-ft tasks resume {control.task_id}`" if control.task_id else ""
        print(f"aborted{hint}", file=sys.stderr)
        if control.output_dir:
            print(control.output_dir, flush=True)
        return EXIT_CANCELLED
    finally:
        control.restore(previous)
        manager.shutdown()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
    metrics = result.metrics
    if metrics.get("final_loss") is not None:
        print(f"Steps {metrics.get('global_step')}/{metrics.get('total_steps')}, final loss "
              f"{metrics['final_loss']:.4f}, padding {100 * (metrics.get('padding_fraction') or 0):.1f}%")
    print(f"Run {result.status} (task {result.task_id}): {result.output_dir}")
    print(result.output_dir, flush=True)
    return {"completed": EXIT_OK, "cancelled": EXIT_CANCELLED}.get(result.status, EXIT_FAILED)


def check_dataset(config: Any) -> bool:
    """Print the data report; False (with the reasons) when the dataset cannot be used. Token lengths
    are measured with the model's tokenizer (on a sample of rows) when it is on this machine, so a
    dataset whose answers are all cut off at cutoff_len is refused here, not after loading the model."""
    from sage_ft.data.cutoff import measure_cutoff
    from sage_ft.data.load import DataError
    from sage_ft.training.inputs import load_run_dataset

    try:
        report = load_run_dataset(config)
    except DataError as exc:
        print(f"error: dataset cannot be used, the run was not started:\n{exc}", file=sys.stderr)
        return False
    stats = measure_cutoff(report, config.model_name_or_path, config.cutoff_len, config.template)
    print(report.summary(), flush=True)
    if stats is not None and stats.problem():
        print(f"error: dataset cannot be used, the run was not started: {stats.problem()}", file=sys.stderr)
        return False
    return True


def _print_progress(event: dict[str, Any]) -> None:
    step, total = event.get("step"), event.get("total_steps")
    if event.get("eval_loss") is not None and event.get("loss") is None:
        print(f"step {step}/{total}  eval_loss {event['eval_loss']:.4f}", flush=True)
        return
    parts = [f"step {step}/{total}", f"epoch {event.get('epoch') or 0:.2f}", f"loss {event.get('loss', 0):.4f}"]
    if event.get("learning_rate") is not None:
        parts.append(f"lr {event['learning_rate']:.3g}")
    if event.get("tokens_per_second"):
        parts.append(f"{event['tokens_per_second']:.0f} tok/s")
    if event.get("eta_seconds") is not None:
        parts.append(f"eta {event['eta_seconds']:.0f}s")
    print("  ".join(parts), flush=True)


_last_preparing_line = [0.0]  # when the last "tokenizing" line was printed: one every 5 s is enough


def _print_preparing(event: dict[str, Any]) -> None:
    from sage_ft.events import Preparation

    preparation = Preparation.of_event(event)
    if preparation is None:
        return
    if preparation.total and 0 < preparation.done < preparation.total:
        if time.monotonic() - _last_preparing_line[0] < 5:
            return
    _last_preparing_line[0] = time.monotonic()
    print(preparation.text, flush=True)


def _print_event(event: dict[str, Any]) -> None:
    """The task manager's events for this run: preparation, progress lines and checkpoints."""
    if event.get("type") != "event":
        return
    if event.get("event") == "preparing":
        _print_preparing(event)
    elif event.get("event") == "metric_update":
        _print_progress(event)
    elif event.get("event") == "checkpoint_saved":
        print(f"checkpoint saved: {event['path']}", flush=True)
    elif event.get("event") == "log" and event.get("message"):  # what the run says of its data, memory, compile
        print(event["message"], flush=True)


class _ForegroundControl:
    """Ctrl-C / SIGTERM handling: the first cancels through the task store (the adapter is saved,
    exactly as a cancel from the web UI); a second one aborts at once."""

    def __init__(self, manager: Any):
        self.manager = manager
        self.task_id: int | None = None
        self.output_dir: str | None = None
        self._cancelling = False

    def started(self, task: Any) -> None:
        self.task_id, self.output_dir = task.id, task.output_dir
        print(f"Run directory: {task.output_dir} (task {task.id}; it also shows in the web UI and "
              "`sage-ft tasks list`)", flush=True)

    def on_signal(self, signum: int, frame: Any) -> None:
        if self._cancelling or self.task_id is None:
            raise KeyboardInterrupt
        self._cancelling = True
        print("\ncancelling: after the current step, whose adapter is saved (a run still preparing stops at once); "
              "Ctrl-C again to abort",
              file=sys.stderr, flush=True)
        # On a thread: the handler interrupts the training thread, which may hold the run's lock or
        # a database transaction that cancel() also needs.
        threading.Thread(target=self._cancel, args=(self.task_id,), daemon=True, name="cli-cancel").start()

    def _cancel(self, task_id: int) -> None:
        from sage_ft.tasks import TaskError

        try:
            self.manager.cancel(task_id)
        except TaskError as exc:  # it ended meanwhile
            print(f"note: {exc}", file=sys.stderr, flush=True)

    def install(self) -> tuple[Any, Any]:
        return signal.signal(signal.SIGINT, self.on_signal), signal.signal(signal.SIGTERM, self.on_signal)

    @staticmethod
    def restore(previous: tuple[Any, Any]) -> None:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
