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


class AgentProtocolError(RuntimeError):
    """``ptagent``'s reply is not what guest/PROTOCOL.md defines (harness and agent disagree)."""

    def __init__(self, args: list[str], reply: object, problem: str) -> None:
        shown = repr(reply)
        if len(shown) > 400:
            shown = shown[:400] + "..."
        super().__init__(f"ptagent {' '.join(args)}: {problem}; reply {shown}")
        self.command = list(args)
        self.reply = reply
        self.problem = problem
