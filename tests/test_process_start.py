"""Recorded processes (task owners, task workers, chat servers and their owners) stay recognised when
the wall clock is stepped.

The kernel moves the boot time it reports whenever the wall clock is stepped (NTP, a virtual machine
resumed or migrated), and psutil's ``create_time()`` is that boot time plus the start's clock ticks. A
CI run failed in 8 tests at once this way: the app took its own running task for interrupted, and a
second sage-ft process found no live chat server. The step is made here as psutil sees it, by moving
the boot time its Linux backend reads; changing this machine's real clock would disturb every other
process on it.
"""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from sage_ft import process_start
from sage_ft.serving import registry
from sage_ft.tasks import TaskManager
from sage_ft.tasks.procinfo import current_identity, identity_of


@pytest.fixture()
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _step_the_wall_clock(monkeypatch, seconds: float) -> None:
    real_boot_time = psutil._pslinux.boot_time
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: real_boot_time() + seconds)


def test_a_process_is_named_by_pid_and_start(sleeper):
    start = process_start.start_time_of(sleeper.pid)
    assert start is not None and 0 < start < time.clock_gettime(time.CLOCK_BOOTTIME)
    assert process_start.is_running(sleeper.pid, start)
    assert not process_start.is_running(sleeper.pid, start - 100)  # same pid, another start: not ours
    assert not process_start.is_running(sleeper.pid, None) and not process_start.is_running(None, start)
    sleeper.kill()
    sleeper.wait()
    assert not process_start.is_running(sleeper.pid, start) and process_start.start_time_of(sleeper.pid) is None


def test_a_step_of_the_wall_clock_keeps_every_recorded_process_alive(sleeper, monkeypatch, task_db):
    child = identity_of(sleeper.pid)
    me = current_identity()
    owner = registry.owner_identity()
    manager = TaskManager(task_db, start_worker=True)
    try:
        deadline = time.monotonic() + 10
        while not manager.workers() and time.monotonic() < deadline:
            time.sleep(0.1)
        wall_clock_start = psutil.Process(sleeper.pid).create_time()

        _step_the_wall_clock(monkeypatch, 5.0)

        assert psutil.Process(sleeper.pid).create_time() == pytest.approx(wall_clock_start + 5.0)  # psutil saw it
        assert child.is_alive() and me.is_alive() and me.is_current_process()
        assert registry.owner_alive(owner)
        assert [w["pid"] for w in manager.workers()] == [me.pid]
    finally:
        manager.shutdown()


def test_records_of_earlier_versions_hold_wall_clock_times_and_still_match(sleeper):
    """An app or a CLI run of the previous version may still be running when this one starts."""
    wall_clock_start = psutil.Process(sleeper.pid).create_time()
    assert process_start.is_running(sleeper.pid, wall_clock_start)
    assert process_start.started_at(sleeper.pid, wall_clock_start)
    assert not process_start.is_running(sleeper.pid, wall_clock_start - 100)
