"""Errors of a guest run (shared by :mod:`.guest` and its mixins)."""

from __future__ import annotations


class GuestError(RuntimeError):
    """The guest failed: boot, kernel panic, QEMU exit, SSH hang. Includes the console tail."""


class AgentError(RuntimeError):
    """``ptagent`` answered with an error object."""

    def __init__(self, errno: int, msg: str) -> None:
        super().__init__(f"ptagent: {msg} (errno {errno})")
        self.errno = errno
        self.msg = msg
