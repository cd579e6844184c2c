"""Stop every chat server this process owns when the process ends.

A vLLM child outlives its parent unless someone stops it, holding its port and (on a GPU) its
memory; the next app would then find a stranger on its port. So every ``ServerManager`` registers
here: an ``atexit`` hook covers normal exits, and SIGTERM/SIGINT handlers stop the servers and then
chain to whatever handler was there before (Gradio's and uvicorn's shutdown still run).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
import weakref
from typing import Any, Protocol


class _Closable(Protocol):
    def close(self) -> None: ...


_MANAGERS: weakref.WeakSet[Any] = weakref.WeakSet()
_HANDLERS_INSTALLED = False
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def register(manager: _Closable, install_handlers: bool = True) -> None:
    """Have ``manager.close()`` called when the process exits (weakly held: a dropped manager is forgotten)."""
    if install_handlers:
        _install_exit_handlers()
    _MANAGERS.add(manager)


def stop_all_servers() -> None:
    """Stop every server any manager of this process owns (exit path)."""
    for manager in list(_MANAGERS):
        with contextlib.suppress(Exception):
            manager.close()


def _on_signal(signum: int, frame: Any) -> None:
    stop_all_servers()
    previous = _PREVIOUS_HANDLERS.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_exit_handlers() -> None:
    """atexit + SIGTERM/SIGINT handlers that stop our servers and then chain to the previous handlers."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(stop_all_servers)
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread; atexit still covers normal exits
    for sig in (signal.SIGTERM, signal.SIGINT):
        _PREVIOUS_HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, _on_signal)
