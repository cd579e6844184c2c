"""The Train form remembers its values in the browser: a refresh, a closed tab or an app restart does
not throw away a half-finished configuration (a common complaint about other studios' forms).

Kept per browser (``gr.BrowserState``: the page's localStorage, encrypted), so two people on one
shared app each keep their own draft. The encryption key lives in the data home, so a restarted app
can still read what the browser stored. Only values that form a valid config are stored, as the
settings that differ from the defaults (the same dict as ``TrainConfig.to_dict(only_changed=True)``).
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from sage_ft import paths
from sage_ft.atomic import atomic_writer
from sage_ft.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

STORAGE_KEY = "sage-ft-train-form"
_KEY_FILE = "webui-form.key"


def browser_secret() -> str:
    """The key the browser encrypts what it keeps with (this draft, the Chat tab's conversations): made
    once per data home, readable by its owner only."""
    path = paths.home() / _KEY_FILE
    try:
        key = path.read_text(encoding="utf-8").strip()
        if len(key) >= 16:
            return key
    except (OSError, UnicodeDecodeError):
        pass
    key = secrets.token_hex(16)
    try:
        with atomic_writer(path, mode=0o600) as fh:
            fh.write(key)
    except OSError as exc:  # an unwritable home: drafts then last until the app restarts
        log.warning("cannot store %s (%s): the Train form forgets its values when the app restarts", path, exc)
    return key


def remember(config: TrainConfig) -> dict[str, Any]:
    """What the browser stores for ``config``: the settings that differ from the defaults."""
    return config.to_dict(only_changed=True)


def recall(draft: Any) -> TrainConfig | None:
    """The config a stored draft describes; None for no draft or one whose values this version rejects
    (say, a value now out of range: the form then opens with its defaults). Keys this version does not
    know (a renamed setting) are dropped and the rest is restored."""
    if not isinstance(draft, dict) or not draft:
        return None
    try:
        config, unknown = TrainConfig.from_dict(draft)
    except (ConfigError, TypeError) as exc:
        log.info("ignoring the browser's stored Train form: %s", exc)
        return None
    if unknown:
        log.info("the browser's stored Train form has keys this version does not know: %s", ", ".join(unknown))
    return config
