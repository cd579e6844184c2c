"""EventEmitter and the events.jsonl contract between processes."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from sage_ft.events import EventEmitter, read_events


def test_listeners_history_and_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "events.jsonl"
    emitter = EventEmitter(path)
    seen: list[str] = []
    emitter.on("metric_update", lambda e: seen.append(f"m{e['step']}"))
    emitter.on("*", lambda e: seen.append(e["event"]))
    emitter.emit("training_start", total_steps=2)
    emitter.emit("metric_update", step=1, loss=2.5)
    assert seen == ["training_start", "m1", "metric_update"]
    assert [e["event"] for e in emitter.get_history()] == ["training_start", "metric_update"]
    assert emitter.get_history("metric_update")[0]["loss"] == 2.5
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["event"] for x in lines] == ["training_start", "metric_update"]


def test_a_failing_listener_never_breaks_the_emitter(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    emitter = EventEmitter(tmp_path / "e.jsonl")
    after: list[int] = []

    def boom(_event: dict) -> None:
        raise RuntimeError("listener bug")

    emitter.on("metric_update", boom)
    emitter.on("metric_update", lambda e: after.append(e["step"]))
    emitter.emit("metric_update", step=7)
    assert after == [7]
    assert "listener bug" in caplog.text


def test_unknown_event_names_are_refused(tmp_path: Path) -> None:
    emitter = EventEmitter()
    with pytest.raises(ValueError, match="unknown event"):
        emitter.emit("trainig_start")
    with pytest.raises(ValueError, match="known: training_start"):
        emitter.on("nope", print)


def test_batch_events_are_throttled_in_history_but_reach_listeners() -> None:
    emitter = EventEmitter(throttle_s=3600)
    calls: list[int] = []
    emitter.on("batch_end", lambda e: calls.append(e["step"]))
    for step in range(5):
        emitter.emit("batch_end", step=step)
    assert calls == [0, 1, 2, 3, 4]
    assert [e["step"] for e in emitter.get_history("batch_end")] == [0]


def test_read_events_follows_a_growing_file_and_skips_partial_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    events, offset = read_events(path)
    assert events == [] and offset == 0
    path.write_text('{"event": "training_start"}\n{"event": "metric_update", "st')
    events, offset = read_events(path)
    assert [e["event"] for e in events] == ["training_start"]
    with path.open("a") as fh:
        fh.write('ep": 1}\n')
    events, offset2 = read_events(path, offset)
    assert events == [{"event": "metric_update", "step": 1}]
    assert offset2 == path.stat().st_size


def test_concurrent_emitters_write_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    emitter = EventEmitter(path)

    def burst(n: int) -> None:
        for i in range(200):
            emitter.emit("metric_update", step=i, worker=n, text="x" * 100)

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events, _ = read_events(path)
    assert len(events) == 800


def test_metrics_history_reads_only_what_was_appended(tmp_path):
    """A page asks for a run's curves every 2 s: already-read lines are not parsed again, appended
    ones are, and a replaced file (a new run in the same folder) is read from the start."""
    from sage_ft.events import EventEmitter
    from sage_ft.tasks.rundir import metrics_history

    path = tmp_path / "events.jsonl"
    emitter = EventEmitter(path)
    for step in range(1, 7):
        emitter.emit("metric_update", step=step, loss=1.0 / step)
    assert [e["step"] for e in metrics_history(tmp_path)] == [1, 2, 3, 4, 5, 6]

    # Overwrite already-read bytes in place (same file, same first event): a re-parse would see garbage.
    size = path.stat().st_size
    assert size > 200
    with path.open("r+b") as fh:
        fh.seek(128)
        fh.write(b"x" * (size - 129))
    emitter.emit("metric_update", step=7, loss=0.3)
    emitter.emit("log", message="not a metric")
    assert [e["step"] for e in metrics_history(tmp_path)] == [1, 2, 3, 4, 5, 6, 7]

    path.unlink()
    replacement = EventEmitter(path)
    for step in range(1, 12):  # a new run, already longer than the old file: still read from its start
        replacement.emit("metric_update", step=step, loss=0.7)
    assert [e["step"] for e in metrics_history(tmp_path)] == list(range(1, 12))
    assert metrics_history(tmp_path / "missing") == []
