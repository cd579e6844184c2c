"""``FineTuneRun``: one LoRA fine-tuning run, in process, observable and controllable.

The run wraps transformers' ``Trainer`` and peft's LoRA; what it adds is everything a studio needs
around them: the run directory (see docs/architecture.md), validated inputs before any compute, a
fast default batching path (``collate``), events and live state (``callbacks``), cancel/pause
between steps, resume from the last complete checkpoint, and a run that never raises for its own
failures: ``run()`` returns ``RunResult(status="failed", error=...)`` and records the reason in the
meta, the events and ``logs.txt``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sage_ft import paths
from sage_ft.config import ConfigError, TrainConfig
from sage_ft.events import EventEmitter
from sage_ft.training.meta import library_versions, read_meta, write_meta
from sage_ft.training.state import RunControl, RunState

log = logging.getLogger("sage_ft.training")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BUILTIN_DATASETS = ("docs-sample",)


class RunFailure(RuntimeError):
    """A run-level problem with a message meant for the user (no traceback needed)."""


class CancelledBeforeTraining(Exception):
    """A cancel that arrived while the run was still preparing (data, tokenizer, model): the run
    ends cancelled at once, with nothing trained and no adapter written."""


@dataclass
class RunResult:
    status: str  # completed | failed | cancelled
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"


class FineTuneRun:
    """One run of ``config``; ``run()`` blocks, the other methods are safe from any thread."""

    def __init__(self, config: TrainConfig, emitter: EventEmitter | None = None):
        config.validate()
        self.config = config
        self.is_main_process = is_main_process()
        self.output_dir = resolve_output_dir(config)
        self.emitter = emitter or EventEmitter(self.output_dir / "events.jsonl" if self.is_main_process else None)
        self._state = RunState(total_epochs=config.num_train_epochs)
        self._control = RunControl()
        self._meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ control (any thread)
    def cancel(self) -> None:
        """Stop after the current step; the adapter is saved as it is and the meta says cancelled."""
        self._control.cancel()

    @property
    def cancel_requested(self) -> bool:
        return self._control.cancelled

    def pause(self) -> None:
        self._control.pause()

    def resume(self) -> None:
        self._control.resume()

    def get_current_state(self) -> dict[str, Any]:
        return self._state.snapshot()

    @property
    def resumed_from(self) -> str | None:
        """The checkpoint this run continued from (set once training started), else None."""
        return self._meta.get("resumed_from")

    # ------------------------------------------------------------------ the run
    def run(self) -> RunResult:
        """Train; never raises for run failures (they become ``status="failed"``).

        In a data-parallel run (``RANK`` set by the launcher) every rank trains, reads checkpoints
        from and writes checkpoints to the same ``output_dir``, but only rank 0 writes the run's
        own files (meta, events, logs, config, adapter), so readers never see several writers.
        """
        main = self.is_main_process
        status, error, metrics = "failed", None, {}
        self._state.update(status="running", started_at=time.time())
        handler = None
        try:
            self._meta = self._initial_meta()
            if main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                handler = _attach_log_file(self.output_dir / "logs.txt")
                self.config.save_yaml(self.output_dir / "config.yaml")
                write_meta(self.output_dir, self._meta)
            log.info("run %s: model %s, dataset %s", self.output_dir, self.config.model_name_or_path,
                     self.config.dataset)
            status, metrics = self._train()
        except CancelledBeforeTraining:
            status = "cancelled"
            log.info("cancelled before the first training step of this run: it trained nothing and wrote no adapter")
        except KeyboardInterrupt:
            status, error = "cancelled", "interrupted"
            raise
        except Exception as exc:  # every failure ends the run as failed, with the reason recorded
            status, error = "failed", describe_failure(exc)
            log.error("run failed: %s", error)
            if not is_explained(exc):
                log.error("%s", traceback.format_exc())
            self.emitter.emit("error_occurred", error=error,
                              traceback="".join(traceback.format_exception(exc)[-8:]))
        finally:
            self._finish(status, error, metrics)
            if handler is not None:
                _detach_log_file(handler)
        return RunResult(status=status, output_dir=self.output_dir, metrics=metrics, error=error)

    def _finish(self, status: str, error: str | None, metrics: dict[str, Any]) -> None:
        self._state.update(status=status, is_training=False, error=error,
                           eta_seconds=0.0 if status == "completed" else None)
        self._meta.update(status=status, error=error, metrics=metrics, finished_at=_now(),
                          duration_seconds=round(time.time() - (self._state.started_at or time.time()), 2))
        if self.is_main_process:
            try:
                write_meta(self.output_dir, self._meta)
            except OSError as exc:
                log.error("could not write %s/finetune_meta.json: %s", self.output_dir, exc)
        self.emitter.emit("training_end", status=status, metrics=metrics, error=error,
                          output_dir=str(self.output_dir))
        log.info("run %s: %s%s", self.output_dir.name, status, f" ({error})" if error else "")

    def _initial_meta(self) -> dict[str, Any]:
        previous = read_meta(self.output_dir) if self.config.resume_from_checkpoint and self.is_main_process else {}
        return {
            "status": "running",
            "run_name": self.config.run_name or self.output_dir.name,
            "output_dir": str(self.output_dir),
            "base_model": self.config.model_name_or_path,
            "base_model_path": None,
            "dataset": self.config.datasets,
            "config": self.config.to_dict(),
            "lora": {"rank": self.config.lora_rank, "alpha": self.config.effective_lora_alpha,
                     "targets": self.config.lora_targets, "use_rslora": self.config.use_rslora,
                     "use_dora": self.config.use_dora},
            "created_at": previous.get("created_at", _now()),
            "started_at": _now(),
            "resumed_from": None,
            "versions": library_versions(),
        }

    def _train(self) -> tuple[str, dict[str, Any]]:
        from sage_ft.training import engine

        return engine.train(self)


# ---------------------------------------------------------------------- helpers


def resolve_output_dir(config: TrainConfig) -> Path:
    """The run directory (see ``FineTuneRun``); refuses to mix two runs in one folder."""
    resume = config.resume_from_checkpoint
    if config.output_dir.strip():
        out = Path(config.output_dir).expanduser().resolve()
    elif resume and resume != "last":
        out = Path(resume).expanduser().resolve().parent
    elif resume == "last":
        raise ConfigError(["resume_from_checkpoint: 'last' needs output_dir set to the run directory to resume"])
    else:
        base = config.run_name.strip() or f"{_slug(Path(config.model_name_or_path).name)}-" \
                                           f"{_slug(Path(config.datasets[0]).stem) if config.datasets else 'data'}"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out = paths.runs_dir() / f"{_slug(base)}-{stamp}"
        n = 2
        while out.exists():
            out = paths.runs_dir() / f"{_slug(base)}-{stamp}-{n}"
            n += 1
        return out
    if out.exists() and not out.is_dir():
        raise ConfigError([f"output_dir: {out} is a file; give a directory"])
    if out.exists() and any(out.iterdir()) and not (config.overwrite_output_dir or resume):
        raise ConfigError([f"output_dir: {out} already exists and is not empty; choose another directory, "
                           "set overwrite_output_dir: true, or resume_from_checkpoint: last"])
    return out


def is_main_process() -> bool:
    """Rank 0 of a data-parallel run (``RANK`` from torchrun/accelerate), or a single-process run."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:60] or "run"


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


# Failures whose message says what is wrong and what to do: shown without a traceback.
_EXPLAINED = ("ModelError", "DataError", "NonFiniteLossError", "CheckpointSaveError")


def is_explained(exc: BaseException) -> bool:
    """Whether ``exc``'s message is meant for the user (a traceback would only bury it)."""
    return isinstance(exc, (RunFailure, ConfigError)) or type(exc).__name__ in _EXPLAINED


def describe_failure(exc: BaseException) -> str:
    """A one-line reason with what to do, for the meta, the events and the UI."""
    text = str(exc) or type(exc).__name__
    low = text.lower()
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"disk full while writing ({text}); free space under {paths.home()} or choose another output_dir"
    if "out of memory" in low or type(exc).__name__ == "OutOfMemoryError":
        return (f"out of memory ({text.splitlines()[0][:200]}); lower per_device_train_batch_size or cutoff_len, "
                "enable gradient_checkpointing, or use a smaller model")
    if type(exc).__module__.startswith(("torch._dynamo", "torch._inductor")):  # only with torch_compile on
        return (f"torch_compile failed ({type(exc).__name__}: {_first_line(text)[:300]}); turn torch_compile off "
                "(Advanced) and start again")
    if is_explained(exc) or isinstance(exc, ValueError):
        return text
    return f"{type(exc).__name__}: {text}"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _attach_log_file(path: Path) -> logging.Handler:
    """Send this run's log (ours and the libraries' warnings) to ``logs.txt``, appending on resume."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.setLevel(logging.INFO)
    for name in ("", "transformers"):  # transformers' logger does not propagate to the root
        logging.getLogger(name).addHandler(handler)
    ours = logging.getLogger("sage_ft")
    handler._sage_previous_level = ours.level  # type: ignore[attr-defined]
    if ours.getEffectiveLevel() > logging.INFO:
        ours.setLevel(logging.INFO)
    return handler


def _detach_log_file(handler: logging.Handler) -> None:
    for name in ("", "transformers"):
        logging.getLogger(name).removeHandler(handler)
    logging.getLogger("sage_ft").setLevel(getattr(handler, "_sage_previous_level", logging.NOTSET))
    handler.close()


__all__ = ["FineTuneRun", "RunResult", "RunFailure", "CancelledBeforeTraining", "resolve_output_dir", "describe_failure", "is_main_process"]
