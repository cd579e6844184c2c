"""Stop every chat server this process owns when the process ends.

A vLLM child outlives its parent unless someone stops it, holding its port and (on a GPU) its
memory; the next app would then find a stranger on its port. So every ``ServerManager`` registers
here: an ``atexit`` hook covers normal exits, and a SIGTERM handler stops the servers and then chains
to whatever handler was there before — or, instead of the default handler's instant death, exits by
``SystemExit`` so the program's own clean-up (``finally`` blocks, atexit) runs as on Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
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
    """SIGTERM: stop our servers now, then run the previous handler — or, where that was the default
    (which kills the process on the spot, skipping every ``finally``), leave by ``SystemExit`` so that
    the process's own clean-up runs as it does on Ctrl-C. SIGINT: only the previous handler (Python's
    KeyboardInterrupt): a program may take Ctrl-C to mean "stop this reply" and go on; the servers are
    stopped by its ``finally`` blocks or by the atexit hook when it does end."""
    previous = _PREVIOUS_HANDLERS.get(signum)
    if signum != signal.SIGINT:
        stop_all_servers()
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)


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
