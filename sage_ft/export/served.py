"""Who is serving a model directory right now, so that an export never overwrites weights being served.

A chat server loads its weights once: after an export overwrote the directory it serves, the chat
would name the new export (banner, ``sage_ft_export.json``) while answering with the old weights, and
silently change at its next restart. So an overwrite is refused while anything serves the target:
the vLLM servers of every live sage-ft process (the serving registry records each one's model
directory and its adapters) and this process's own chat when it runs on the in-process transformers
backend (which the registry does not list).

The serving area's own merge cache (a run's ``merged_model``, marked by its merge record) is exempt:
the switch that re-merges it starts a new server on the new weights and retires the one serving the old.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sage_ft.export.source import ExportError


def _resolved(path: str | Path | None) -> Path | None:
    if not path:
        return None
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError):
        return None


def _within(path: str | Path | None, directory: Path) -> bool:
    """``path`` is ``directory`` or lies inside it (a served adapter inside an export counts too)."""
    resolved = _resolved(path)
    return resolved is not None and (resolved == directory or resolved.is_relative_to(directory))


def _registry_uses(directory: Path) -> list[str]:
    from sage_ft.serving import registry

    uses = []
    for entry in registry.live_entries():
        spec = entry.get("spec") if isinstance(entry.get("spec"), dict) else {}
        adapters = entry.get("adapters") if isinstance(entry.get("adapters"), dict) else {}
        served = [spec.get("model_path")] + [a.get("path") for a in adapters.values() if isinstance(a, dict)]
        if not any(_within(p, directory) for p in served):
            continue
        label = entry.get("display_name") or entry.get("model") or Path(str(spec.get("model_path"))).name
        if registry.owned_by_me(entry):
            owner = f"this sage-ft process (pid {os.getpid()})"
        elif registry.owner_alive(entry):
            owner = f"sage-ft process {entry.get('owner_pid')}"
        else:
            owner = (f"no live sage-ft process (sage-ft process {entry.get('owner_pid')} left it running; the next "
                     "app start adopts or ends it)")
        state = "" if entry.get("current") else " (starting, or finishing its last replies before it stops)"
        uses.append(f"the vLLM chat server on port {entry.get('port')} (pid {entry.get('pid')}) of {owner} "
                    f"serves it as {label!r}{state}")
    return uses


def _manager_uses(directory: Path, manager: Any) -> list[str]:
    """This process's chat when it runs in-process (transformers); its vLLM servers are in the registry."""
    if manager is None or getattr(manager, "backend", None) != "transformers":
        return []
    status = manager.status()
    label = status.get("model_label") or status.get("model")
    if _within(status.get("switching_to"), directory):
        return [f"the chat of this sage-ft process (in-process transformers backend) is loading it ({label})"]
    if status.get("state") in ("ready", "switching", "crashed") and (
            _within(status.get("model_path"), directory) or _within(status.get("base_model"), directory)):
        return [f"the chat of this sage-ft process (in-process transformers backend) serves it as {label!r}"]
    return []


def serving_uses(model_dir: str | Path, chat_manager: Any = None) -> list[str]:
    """One sentence per server that serves ``model_dir`` (or something inside it) now; empty when none.

    ``chat_manager`` is this process's ``ServerManager`` when it has one (the web app's chat).
    """
    directory = _resolved(model_dir)
    if directory is None:
        return []
    return _registry_uses(directory) + _manager_uses(directory, chat_manager)


def refuse_if_served(out_dir: str | Path, chat_manager: Any = None) -> None:
    """Raise an ExportError naming who serves ``out_dir`` and what to do, when anything does."""
    from sage_ft.serving.merging import MERGE_RECORD

    if (Path(out_dir) / MERGE_RECORD).exists():
        return
    uses = serving_uses(out_dir, chat_manager)
    if not uses:
        return
    raise ExportError(
        f"refusing to overwrite {out_dir}: it is being served ({'; '.join(uses)}). A running server keeps the "
        "weights it loaded, so the chat would name the new export while answering with the old weights (and "
        "change silently at its next restart). Switch the chat to another model first (the Chat tab, or "
        "`sage-ft switch MODEL`), or export under another name.")
