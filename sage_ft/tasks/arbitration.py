"""Memory arbitration between the task queue and the chat server: ``ServingArbiter``.

One device (a GPU, or the machine's RAM on CPU) holds both the served chat model and a training
run. Before each run the queue worker asks the arbiter; it checks with the memory estimator
(``sage_ft.estimate.check_fit``, which measures what is free *now*, i.e. beside the served model)
whether the run fits. Only when it does not is the chat server released (vLLM sleeps on a GPU with
sleep mode, else it is stopped), and it is brought back when the run ends — so a chat stays
available whenever memory allows, and a run never fails for memory the chat server could give up.

What the UI should show (the returned texts are written for users):
- ``before_run``'s message, when not None, as an info toast and in the task's log: it arrives to
  ``TaskManager.subscribe`` listeners as ``{"type": "arbiter", "hook": "before_run", "message"}``
  and is in the run's ``events.jsonl`` as a ``log`` event with ``source: "memory"`` (for clients in
  other processes).
- The chat tab's server status: ``ServerManager.status()["state"] == "released"`` with its
  ``message`` ("chat model ... paused to free memory for training; it comes back when the run
  ends") while the run goes on; a chat sent meanwhile gets a retryable "paused" error.
- After the run, ``ServingArbiter.last_message`` (also ``status()["message"]``) says the chat model
  is back, or why it could not be restarted (then the user restarts it from the chat tab).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from sage_ft.config import TrainConfig

log = logging.getLogger(__name__)


def _check_fit_now(config: TrainConfig) -> Any:
    from sage_ft.estimate import check_fit

    return check_fit(config)


class ServingArbiter:
    """``TaskManager(arbiter=ServingArbiter(server_manager))``: release the chat server for runs
    that do not fit beside it, restore it afterwards.

    ``server_manager`` needs ``status()``, ``release_for_training(estimate_bytes)`` and
    ``restore_after_training()`` (``sage_ft.serving.ServerManager``). ``estimate_fn(config)``
    returns a ``FitReport`` (``fits``, ``warning``, ``estimate``); the default is ``check_fit``
    against the device as it is now. When the estimate cannot be made, the server is released:
    a paused chat costs a restart, a run out of memory costs the run (or, on CPU, the app).
    """

    def __init__(self, server_manager: Any, estimate_fn: Callable[[TrainConfig], Any] | None = None):
        self.server_manager = server_manager
        self.estimate_fn = estimate_fn or _check_fit_now
        self.released = False
        self.last_message: str | None = None

    def before_run(self, config: TrainConfig) -> str | None:
        """None when nothing changes; else what happened to the chat server, for the user."""
        state = self.server_manager.status().get("state")
        if state != "ready":
            return None  # nothing served (stopped, starting, crashed, already released)
        try:
            report = self.estimate_fn(config)
        except Exception as exc:  # an unknown model size must not block the queue
            log.warning("memory estimate for the run failed (%s); releasing the chat server to be safe", exc)
            report, why = None, f"the run's memory need could not be estimated ({exc})"
        else:
            if report.fits:
                return None
            why = report.warning or "the run does not fit beside the chat model"
        message = self.server_manager.release_for_training(None)
        self.released = self.server_manager.status().get("state") == "released"
        self.last_message = f"{message} ({why.strip()})" if self.released else message
        return self.last_message

    def after_run(self, config: TrainConfig) -> None:
        """Bring the chat model back if ``before_run`` released it."""
        if not self.released:
            return
        self.released = False
        self.last_message = self.server_manager.restore_after_training()
        log.info("%s", self.last_message)
