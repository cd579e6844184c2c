"""The bridge from transformers' ``Trainer`` loop to sage-ft events, live state and cancel/pause.

Everything here runs between optimizer steps in the training thread. Per-step work is kept to a
few attribute updates and two (throttled) ``batch_*`` events: no disk writes, no device syncs of our
own — loss and grad norm are only read at logging steps, where the Trainer already syncs. The one
exception is a data-parallel run: there the cancel flag is all-reduced each step (one int), so a
cancel seen by any rank stops every rank at the same step.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from sage_ft.events import EventEmitter
from sage_ft.training.state import RunControl, RunState

log = logging.getLogger("sage_ft.training")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient norm became NaN/inf: training diverged."""


def build_callback(emitter: EventEmitter, state: RunState, control: RunControl, collator: Any,
                   trainer_ref: dict[str, Any], extra_start: dict[str, Any]):
    """A ``TrainerCallback`` instance wired to this run (transformers is imported lazily)."""
    from transformers import TrainerCallback

    class EventsCallback(TrainerCallback):
        def __init__(self) -> None:
            self.session_start_time = 0.0
            self.session_start_step = 0
            self.session_start_paused = 0.0
            self.last_log_time = 0.0
            self.last_log_tokens = 0
            self.last_log_paused = 0.0  # control.paused_seconds then: a pause is not time spent training

        def _tokens_seen(self) -> int:
            trainer = trainer_ref.get("trainer")
            return int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0) if trainer else 0

        def on_train_begin(self, args, hf_state, hf_control, **kwargs):
            now = time.time()
            self.session_start_time = self.last_log_time = now
            self.session_start_step = hf_state.global_step
            self.last_log_tokens = self._tokens_seen()
            self.session_start_paused = self.last_log_paused = control.paused_seconds
            state.update(status="running", is_training=True, total_steps=hf_state.max_steps,
                         total_epochs=float(args.num_train_epochs if args.max_steps <= 0 else
                                            hf_state.num_train_epochs or args.num_train_epochs),
                         current_step=hf_state.global_step, started_at=state.started_at or now)
            emitter.emit("training_start", total_steps=hf_state.max_steps, start_step=hf_state.global_step,
                         **extra_start)
            log.info("training: %d optimizer steps (starting at %d)", hf_state.max_steps, hf_state.global_step)

        def on_epoch_begin(self, args, hf_state, hf_control, **kwargs):
            epoch = int(hf_state.epoch or 0)
            state.update(current_epoch=float(hf_state.epoch or 0))
            emitter.emit("epoch_start", epoch=epoch, step=hf_state.global_step)

        def on_epoch_end(self, args, hf_state, hf_control, **kwargs):
            emitter.emit("epoch_end", epoch=max(0, math.ceil(hf_state.epoch or 0) - 1), step=hf_state.global_step)

        def on_step_begin(self, args, hf_state, hf_control, **kwargs):
            # Pause holds here, before the next step: the previous one is complete, logged and saved.
            if control.paused and not control.cancelled:
                step = hf_state.global_step
                state.update(status="paused")
                log.info("paused at step %d", step)
                control.wait_while_paused()
                state.update(status="running")
                log.info("resumed at step %d", step)
            emitter.emit("batch_start", step=hf_state.global_step + 1, total_steps=hf_state.max_steps)

        def on_step_end(self, args, hf_state, hf_control, **kwargs):
            step = hf_state.global_step
            elapsed = time.time() - self.session_start_time - (control.paused_seconds - self.session_start_paused)
            done = step - self.session_start_step
            eta = elapsed / done * (hf_state.max_steps - step) if done > 0 else None
            state.update(current_step=step, current_epoch=float(hf_state.epoch or 0), eta_seconds=eta,
                         padding_fraction=collator.padding_fraction)
            emitter.emit("batch_end", step=step, total_steps=hf_state.max_steps)
            # Decide on the agreed value only: the local flag is set by another thread and may turn
            # True just after the all-reduce, and a rank that stopped on it alone would leave the
            # others waiting in the next step's collectives (it then stops at the next step with all).
            stop = any_rank(control.cancelled)
            if stop and not control.cancelled:
                control.cancel()  # another rank was asked to stop: stop here too, at the same step
            if stop:
                log.info("cancel requested: stopping after step %d", step)
                hf_control.should_training_stop = True
                hf_control.should_save = False
                hf_control.should_evaluate = False

        def on_log(self, args, hf_state, hf_control, logs=None, **kwargs):
            logs = dict(logs or {})
            step = hf_state.global_step
            if "eval_loss" in logs:
                state.update(eval_loss=logs["eval_loss"])
                emitter.emit("metric_update", step=step, total_steps=hf_state.max_steps, epoch=hf_state.epoch,
                             eval_loss=logs["eval_loss"])
                log.info("step %d/%d eval_loss %.4f", step, hf_state.max_steps, logs["eval_loss"])
                return
            if "loss" not in logs:
                return  # the final train summary; reported in training_end
            loss, grad_norm = logs.get("loss"), logs.get("grad_norm")
            for name, value in (("loss", loss), ("grad_norm", grad_norm)):
                if value is not None and not math.isfinite(float(value)):
                    raise NonFiniteLossError(
                        f"{name} became {value} at step {step}: training diverged. Lower learning_rate "
                        f"(now {args.learning_rate:g}), keep max_grad_norm > 0, or use precision fp32/bf16 "
                        "instead of fp16")
            now = time.time()
            tokens = self._tokens_seen()
            trained_s = now - self.last_log_time - (control.paused_seconds - self.last_log_paused)
            tps = (tokens - self.last_log_tokens) / trained_s if trained_s > 0 else None
            self.last_log_time, self.last_log_tokens, self.last_log_paused = now, tokens, control.paused_seconds
            snapshot = state.snapshot()
            state.update(current_loss=loss, learning_rate=logs.get("learning_rate"), grad_norm=grad_norm,
                         tokens_per_second=tps)
            emitter.emit("metric_update", step=step, total_steps=hf_state.max_steps, epoch=hf_state.epoch,
                         loss=loss, learning_rate=logs.get("learning_rate"), grad_norm=grad_norm,
                         tokens_per_second=tps, eta_seconds=snapshot["eta_seconds"],
                         padding_fraction=collator.padding_fraction, tokens_seen=tokens)
            log.info("step %d/%d epoch %.2f loss %.4f lr %.3g grad_norm %s tokens/s %s", step, hf_state.max_steps,
                     hf_state.epoch or 0, loss, logs.get("learning_rate") or 0,
                     f"{grad_norm:.3f}" if grad_norm is not None else "-", f"{tps:.0f}" if tps else "-")

        def on_save(self, args, hf_state, hf_control, **kwargs):
            path = f"{args.output_dir}/checkpoint-{hf_state.global_step}"
            emitter.emit("checkpoint_saved", step=hf_state.global_step, path=path)
            log.info("checkpoint saved: %s", path)

    return EventsCallback()


def any_rank(flag: bool) -> bool:
    """``flag`` OR-ed over every rank of a data-parallel run (just ``flag`` in a single process).

    Called at every step end on every rank, in the same order, so all ranks agree on the step at
    which a cancel takes effect and none is left waiting in the next gradient all-reduce.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
