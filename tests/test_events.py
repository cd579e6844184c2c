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
