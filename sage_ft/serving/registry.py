"""The serving registry: which chat-server children this data home started, and who owns them.

One JSON file under the data home (``serving/servers.json``, mode 0600 because it holds the API
keys). Each entry names the process by pid **and** create time (seconds after boot,
``sage_ft.process_start``), so a restarted app can adopt its server or end it, and a pid reused by an
unrelated process is never touched (style rule 9: record, don't rediscover by process name).
Read-modify-write happens under an ``flock``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sage_ft import paths, process_start
from sage_ft.atomic import atomic_writer


def registry_path() -> Path:
    directory = paths.home() / "serving"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / "servers.json"


def owner_identity() -> dict[str, Any]:
    """This process as a registry owner."""
    return {"owner_pid": os.getpid(), "owner_create_time": process_start.start_time_of(os.getpid())}


def owner_alive(entry: dict[str, Any]) -> bool:
    return process_start.is_running(entry.get("owner_pid"), entry.get("owner_create_time"))


def owned_by_me(entry: dict[str, Any]) -> bool:
    return entry.get("owner_pid") == os.getpid() and owner_alive(entry)


@contextlib.contextmanager
def _locked() -> Iterator[Path]:
    path = registry_path()
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return [e for e in data.get("servers", []) if isinstance(e, dict)] if isinstance(data, dict) else []


def _write(path: Path, entries: list[dict[str, Any]]) -> None:
    with atomic_writer(path, mode=0o600) as fh:  # holds the servers' API keys
        json.dump({"servers": entries}, fh, indent=2)


def read_entries() -> list[dict[str, Any]]:
    with _locked() as path:
        return _read(path)


def entry_of(pid: int) -> dict[str, Any] | None:
    """The entry of server process ``pid`` (None when it has none)."""
    return next((e for e in read_entries() if e.get("pid") == pid), None)


def upsert(entry: dict[str, Any]) -> None:
    """Add or replace the entry of process ``entry['pid']``."""
    with _locked() as path:
        entries = [e for e in _read(path) if e.get("pid") != entry["pid"]]
        entries.append(entry)
        _write(path, entries)


def update(pid: int, **fields: Any) -> None:
    with _locked() as path:
        entries = _read(path)
        for entry in entries:
            if entry.get("pid") == pid:
                entry.update(fields)
        _write(path, entries)


def remove(pid: int) -> None:
    with _locked() as path:
        entries = _read(path)
        kept = [e for e in entries if e.get("pid") != pid]
        if len(kept) != len(entries):
            _write(path, kept)


def drop_request(pid: int, request_id: str) -> None:
    """Remove the switch request ``request_id`` from server ``pid``'s entry (another one is left alone)."""
    with _locked() as path:
        entries = _read(path)
        changed = False
        for entry in entries:
            request = entry.get("switch_request")
            if entry.get("pid") == pid and isinstance(request, dict) and request.get("id") == request_id:
                del entry["switch_request"]
                changed = True
        if changed:
            _write(path, entries)


class ServerChoiceError(LookupError):
    """Several sage-ft processes serve a chat model and none was named, or none serves on the port named."""


def describe(entry: dict[str, Any]) -> str:
    """A served entry for people: which sage-ft process, which model, which port."""
    model = entry.get("display_name") or entry.get("model") or entry.get("spec", {}).get("served_name") or "?"
    return f"pid {entry.get('owner_pid')} serving {model} on port {entry.get('port')} " \
           f"(http://127.0.0.1:{entry.get('port')}/v1)"


def pick_served(port: int | None = None, owner_pid: int | None = None) -> dict[str, Any] | None:
    """The server of another live sage-ft process that a client (``sage-ft switch``/``chat``) acts on: the
    one on ``port`` / owned by ``owner_pid`` when given, else the only one; None when none serves.
    ``ServerChoiceError`` when several serve and none was named, or the one named does not serve."""
    entries = sorted(served_by_others(), key=lambda e: e.get("port") or 0)
    listing = "; ".join(describe(e) for e in entries)
    if port is not None or owner_pid is not None:
        chosen = [e for e in entries if (port is None or e.get("port") == port)
                  and (owner_pid is None or e.get("owner_pid") == owner_pid)]
        if not chosen:
            named = f"port {port}" if port is not None else f"the sage-ft process pid {owner_pid}"
            raise ServerChoiceError(f"no sage-ft process serves a chat model on {named}; "
                                    + (f"serving now: {listing}" if entries else "none serves one now"))
        return chosen[0]
    if len(entries) > 1:
        raise ServerChoiceError(f"{len(entries)} sage-ft processes serve a chat model: {listing}; "
                                "name one with --port")
    return entries[0] if entries else None


def served_by_others() -> list[dict[str, Any]]:
    """Live entries of the server that answers chats (``current``) for another live sage-ft process."""
    return [e for e in live_entries() if e.get("current") and owner_alive(e) and not owned_by_me(e)]


def live_entries() -> list[dict[str, Any]]:
    """Entries whose server process is still the one recorded; dead ones are dropped from the file."""
    with _locked() as path:
        entries = _read(path)
        live = [e for e in entries if process_start.is_running(e.get("pid"), e.get("create_time"))]
        if len(live) != len(entries):
            _write(path, live)
        return live
