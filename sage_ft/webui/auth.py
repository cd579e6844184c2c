"""Login for an exposed app (``--share`` or a non-loopback ``--host``).

Gradio checks the password but does not limit attempts, so ``LoginGuard`` answers every failed
login only after a delay that doubles with each consecutive failure (capped), and it answers
failures one at a time: parallel guessing gains nothing. Gradio calls the check inside its event
loop, so the check is ``async`` and waits with ``asyncio.sleep`` (a ``time.sleep`` would freeze
every user's page). Passwords are compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class AuthError(ValueError):
    """Unusable ``--auth`` / ``--auth-file`` input; the message says what to write instead."""


def parse_pair(text: str, where: str = "--auth") -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user.strip() or not password:
        raise AuthError(f"{where}: expected user:password (e.g. --auth alice:'a long secret'), got {text!r}")
    return user.strip(), password


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """``user:password`` per line; blank lines and ``#`` comments are skipped."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise AuthError(f"--auth-file {path}: cannot read it ({exc.strerror})") from None
    pairs = [parse_pair(line.strip(), f"--auth-file {path} line {n}")
             for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]
    if not pairs:
        raise AuthError(f"--auth-file {path}: no user:password line found")
    return pairs


def generate_password() -> str:
    return secrets.token_urlsafe(12)


@dataclass
class LoginGuard:
    """``await guard.check(user, password)`` -> bool, slowing down repeated failures."""

    credentials: dict[str, str]
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0
    failures: int = 0  # consecutive failed logins since the last success
    total_failures: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _serial: asyncio.Lock | None = field(default=None, repr=False)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], **kwargs) -> LoginGuard:
        return cls(credentials=dict(pairs), **kwargs)

    def next_delay(self) -> float:
        """How long the next failed attempt waits before it is answered."""
        if self.failures == 0:
            return 0.0
        return min(self.max_delay_s, self.base_delay_s * 2 ** (self.failures - 1))

    def verify(self, username: str, password: str) -> bool:
        expected = self.credentials.get(username)
        # Compare against something even for an unknown user, so timing does not reveal user names.
        ok = hmac.compare_digest((expected or "\0").encode(), (password or "").encode())
        return ok and expected is not None

    async def check(self, username: str, password: str) -> bool:
        if self.verify(username, password):
            with self._lock:
                self.failures = 0
            return True
        if self._serial is None:
            self._serial = asyncio.Lock()
        async with self._serial:
            with self._lock:
                self.failures += 1
                self.total_failures += 1
                delay = self.next_delay()
            log.warning("failed login for user %r (%d in a row); answering in %.1f s",
                        username, self.failures, delay)
            await asyncio.sleep(delay)
        return False
