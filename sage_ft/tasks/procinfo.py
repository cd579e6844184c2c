"""Process identity = pid + start time, so a reused pid is never mistaken for our process.

Task rows record who runs them (and any worker child process) this way; on start-up the manager
decides from these records alone whether a run's process is still alive and which leftover
processes to end. Processes are never searched for by name (style rule 9: record, don't rediscover).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import psutil

from sage_ft import process_start

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessIdentity:
    pid: int
    start_time: float  # seconds after boot (sage_ft.process_start): a wall-clock step cannot change it

    def is_alive(self) -> bool:
        """True when a process with this pid exists, started at this time, and is not a zombie."""
        return process_start.is_running(self.pid, self.start_time)

    def is_current_process(self) -> bool:
        return self.pid == os.getpid() and process_start.started_at(self.pid, self.start_time)


def identity_of(pid: int) -> ProcessIdentity | None:
    """The identity of the live process ``pid``, or None when there is none."""
    start = process_start.start_time_of(pid)
    return None if start is None else ProcessIdentity(pid, start)


_CURRENT: ProcessIdentity | None = None


def current_identity() -> ProcessIdentity:
    """This process's identity (cached; re-read after a fork changes the pid)."""
    global _CURRENT
    if _CURRENT is None or _CURRENT.pid != os.getpid():
        _CURRENT = identity_of(os.getpid())
    assert _CURRENT is not None
    return _CURRENT


def end_process_tree(identity: ProcessIdentity, timeout_s: float = 5.0) -> bool:
    """Terminate the recorded process and its descendants (SIGTERM, then SIGKILL after ``timeout_s``).

    Does nothing unless pid *and* start time still match, so an unrelated process that reused the
    pid is never touched. Returns True when something was ended.
    """
    if not identity.is_alive() or identity.is_current_process():
        return False
    try:
        root = psutil.Process(identity.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)
    log.warning("ended leftover process %s (and %d children)", identity.pid, len(procs) - 1)
    return True
