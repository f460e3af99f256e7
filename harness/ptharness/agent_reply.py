"""``ptagent`` replies parsed exactly as guest/PROTOCOL.md defines them.

A reply is one JSON object on one stdout line. Exit status 0: the command's object, whose keys
and value types must be the documented ones (no key missing, none added). Exit status 1: the
error object ``{"error": MESSAGE, "errno": N}``, raised as :class:`AgentError`. Anything else
(another status, no or several lines, other keys, a string where an integer belongs) raises
:class:`AgentProtocolError` naming the command and the reply.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from .errors import AgentError, AgentProtocolError

__all__ = ["check_reply", "kallsyms", "parse_reply", "system_ram", "vmcoreinfo_location"]

Check = Callable[[Any, str], None]


class _Bad(Exception):
    """One shape violation: where in the reply, and what."""


def _uint(v: Any, where: str) -> None:
    if type(v) is not int or v < 0:  # bool is not an integer here
        raise _Bad(f"{where}: {v!r} is not an unsigned integer")


def _str(v: Any, where: str) -> None:
    if not isinstance(v, str):
        raise _Bad(f"{where}: {v!r} is not a string")


def _bool(v: Any, where: str) -> None:
    if not isinstance(v, bool):
        raise _Bad(f"{where}: {v!r} is not a boolean")


def _hex(v: Any, where: str) -> None:
    _str(v, where)
    try:
        bytes.fromhex(v)
    except ValueError:
        raise _Bad(f"{where}: {v!r} is not hex digits") from None


def _const(value: Any) -> Check:
    def check(v: Any, where: str) -> None:
        if v != value or type(v) is not type(value):
            raise _Bad(f"{where}: {v!r} is not {value!r}")

    return check


def _one_of(*values: str) -> Check:
    def check(v: Any, where: str) -> None:
        if v not in values:
            raise _Bad(f"{where}: {v!r} is not one of {', '.join(values)}")

    return check


def _nullable(check: Check) -> Check:
    def inner(v: Any, where: str) -> None:
        if v is not None:
            check(v, where)

    return inner


def _list(check: Check) -> Check:
    def inner(v: Any, where: str) -> None:
        if not isinstance(v, list):
            raise _Bad(f"{where}: {v!r} is not a list")
        for i, x in enumerate(v):
            check(x, f"{where}[{i}]")

    return inner


def _map(check: Check) -> Check:
    """An object with any string keys, each value passing ``check``."""

    def inner(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(f"{where}: {v!r} is not an object")
        for k, x in v.items():
            check(x, f"{where}.{k}")

    return inner


def _obj(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """An object with exactly the ``required`` keys, plus any of ``optional``."""
    optional = optional or {}

    def inner(v: Any, where: str) -> None:
        if not isinstance(v, dict):
            raise _Bad(f"{where or 'reply'}: {v!r} is not an object")
        missing = sorted(required.keys() - v.keys())
        extra = sorted(v.keys() - required.keys() - optional.keys())
        if missing or extra:
            raise _Bad(f"{where or 'reply'}: keys {sorted(v)}: "
                       + "; ".join(s for s in (missing and f"missing {missing}",
                                               extra and f"unexpected {extra}") if s))
        for k, x in v.items():
            (required.get(k) or optional[k])(x, f"{where}.{k}" if where else k)

    return inner


def _ram_range(v: Any, where: str) -> None:
    _obj({"start": _uint, "end": _uint})(v, where)
    if v["start"] >= v["end"]:
        raise _Bad(f"{where}: start {v['start']:#x} is not below end {v['end']:#x}")


_PROT = _one_of(*(f"{r}{w}{x}" for r in "r-" for w in "w-" for x in "x-"))
_KIND = _one_of("secretmem", "mmap", "canary", "pin")


def _held(kind: Check, pfns: bool = True) -> Check:
    """A held object (secretmem/mmap/mprotect replies; ``list`` entries without pfns)."""
    keys = {"id": _uint, "kind": kind, "va": _uint, "pages": _uint, "prot": _PROT}
    return _obj({**keys, "pfns": _list(_nullable(_uint))} if pfns else keys)


# Command -> the success reply's shape (guest/PROTOCOL.md "Commands").
REPLIES: dict[str, Check] = {
    "info": _obj({
        "uname": _obj({k: _str for k in ("sysname", "release", "version", "machine",
                                         "nodename")}),
        "page_size": _uint,
        "cmdline": _str,
        "vmcoreinfo": _nullable(_obj({"paddr": _uint, "size": _uint})),
        "kallsyms_visible": _bool,
        "kallsyms": _map(_uint),
        "kvars": _map(_uint),
        "system_ram": _list(_ram_range),
    }),
    "kread": _obj({"va": _uint, "hex": _hex}),
    "secretmem": _held(_const("secretmem")),
    "pin": _held(_const("pin")),
    "mmap": _held(_const("mmap")),
    "mprotect": _held(_KIND),
    "canary": _obj({"id": _uint, "kind": _const("canary"), "va": _uint, "pfn": _uint,
                    "offset": _uint, "pattern": _hex}),
    "release": _obj({"released": _list(_uint)}),
    "list": _obj({"objects": _list(_held(_KIND, pfns=False))}),
    "ping": _obj({"pong": _const(True), "pid": _uint, "objects": _uint, "uptime_s": _uint}),
    "memblocks": _obj({"block_size": _uint, "blocks": _list(_obj(
        {"id": _uint, "start": _uint, "state": _str}, {"removable": _bool, "zones": _str}))}),
    "online": _obj({"block": _uint, "state": _str}),
    "offline": _obj({"block": _uint, "state": _str}),
    "insmod": _obj({"loaded": _str}),
    "rmmod": _obj({"removed": _str}),
    "serve": _obj({"serving": _str, "pid": _uint}),
}
_ERROR = _obj({"error": _str, "errno": _uint})


def check_reply(args: str | Sequence[str], reply: Any) -> None:
    """Raise :class:`AgentProtocolError` unless ``reply`` is the success object PROTOCOL.md
    defines for command ``args`` (its name, or the whole argument list)."""
    args = [args] if isinstance(args, str) else list(args)
    shape = REPLIES.get(args[0])
    if shape is None:
        raise AgentProtocolError(args, reply, "no such ptagent command")
    try:
        shape(reply, "")
    except _Bad as e:
        raise AgentProtocolError(args, reply, str(e)) from None


def parse_reply(args: Sequence[str], status: int, stdout: str, stderr: str = "") -> dict[str, Any]:
    """The reply of ``ptagent ARGS`` that exited with ``status`` and printed ``stdout``.

    Returns the success object; raises :class:`AgentError` for the error object (exit 1) and
    :class:`AgentProtocolError` for anything PROTOCOL.md does not define.
    """
    args = list(args)
    if not args:
        raise ValueError("ptagent needs a command")
    lines = stdout.splitlines()
    if len(lines) != 1 or status not in (0, 1):
        raise AgentProtocolError(args, stdout, f"exit status {status}, {len(lines)} stdout "
                                 f"line(s) (want 0 or 1 and one JSON line); stderr "
                                 f"{stderr.strip()[-300:]!r}")
    try:
        reply = json.loads(lines[0])
    except json.JSONDecodeError as e:
        raise AgentProtocolError(args, lines[0], f"not JSON ({e})") from None
    if status == 1:
        try:
            _ERROR(reply, "")
        except _Bad as e:
            raise AgentProtocolError(args, reply, f"exit status 1 without the error object: "
                                                  f"{e}") from None
        raise AgentError(reply["errno"], reply["error"])
    if isinstance(reply, dict) and "error" in reply:
        raise AgentProtocolError(args, reply, "an error object with exit status 0")
    check_reply(args, reply)
    return reply


# --- fields of the `info` reply ------------------------------------------------------------------
def kallsyms(info: dict[str, Any]) -> dict[str, int]:
    """``info``'s kallsyms: symbol -> address (only the symbols the guest has)."""
    return dict(info["kallsyms"])


def system_ram(info: dict[str, Any]) -> list[tuple[int, int]]:
    """``info``'s System RAM ranges as sorted (start, end) pairs, end exclusive."""
    return sorted((r["start"], r["end"]) for r in info["system_ram"])


def vmcoreinfo_location(info: dict[str, Any]) -> tuple[int, int] | None:
    """(PA, size) of the VMCOREINFO note from ``info``; None if the kernel exposes none."""
    v = info["vmcoreinfo"]
    return None if v is None else (v["paddr"], v["size"])
