"""When a process started, as seconds after boot: the part of a process's identity that a step of the
wall clock cannot change.

Wherever sage-ft records a process (task rows, worker rows, the serving registry), it records the pid
*and* the start time, so that a pid reused by an unrelated process is never mistaken for ours. psutil's
``create_time()`` is the boot time plus the start's clock ticks, and the kernel moves the boot time
whenever the wall clock is stepped (NTP, a virtual machine resumed or migrated, a manual ``date -s``).
With wall-clock start times, a step of more than a second made every recorded live process look dead:
the app marked its own running task interrupted, and the next sage-ft process ended the app's chat
server as a leftover of a dead app (seen in CI). Seconds after boot are the start's clock ticks
themselves, which psutil also uses for its own process identity on Linux, and never move.
"""

from __future__ import annotations

import psutil

# Two readings of one process's start differ by rounding only.
TOLERANCE_S = 1.0
# Records written before this module held wall-clock times (seconds since 1970). No machine has been
# up for 30 years, so a value this large is one of those and is compared with the wall-clock time.
_WALL_CLOCK_RECORD_MIN = 1e9


def start_time_of(pid: int) -> float | None:
    """Seconds after boot at which ``pid`` started (alive or a zombie); None when there is no such process."""
    try:
        return psutil.Process(pid).create_time() - psutil.boot_time()
    except (psutil.Error, ValueError):
        return None


def _started_at(proc: psutil.Process, recorded: float) -> bool:
    wall = proc.create_time()
    current = wall if recorded >= _WALL_CLOCK_RECORD_MIN else wall - psutil.boot_time()
    return abs(current - recorded) <= TOLERANCE_S


def started_at(pid: int | None, recorded: float | None) -> bool:
    """True when ``pid`` exists (alive or a zombie) and is the process that started at ``recorded``."""
    if not pid or recorded is None:
        return False
    try:
        return _started_at(psutil.Process(pid), recorded)
    except (psutil.Error, ValueError):
        return False


def is_running(pid: int | None, recorded: float | None) -> bool:
    """True when the process that started at ``recorded`` still runs as ``pid`` (and is not a zombie)."""
    if not pid or recorded is None:
        return False
    try:
        proc = psutil.Process(pid)
        return _started_at(proc, recorded) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.Error, ValueError):
        return False
