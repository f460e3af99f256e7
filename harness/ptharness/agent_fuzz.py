"""Malformed ``ptagent`` commands, and a runner that checks each gets a JSON error reply.

:func:`malformed` draws commands that must all fail (bad numbers, huge N, unknown ids, binary
junk, overlong arguments, wrong argument counts, raw wire requests the CLI could not send);
none can change the guest (no real module or memory block is named, no page count the guest
could hold). :func:`run` sends them in batches as one shell script per SSH command (the
script on stdin: dropbear limits a command line to 9000 bytes), each command's stdout and exit
status captured apart, and parses each strictly (:func:`ptharness.agent_reply.parse_reply`):
clean means "exit status 1 and the error object", with the expected errno where one is known.
Stalled clients (``sleep S | ptagent raw``: connected, never completing the request) run in
the background meanwhile and must get ETIMEDOUT.
"""

from __future__ import annotations

import base64
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .agent_reply import parse_reply
from .errors import AgentError, AgentProtocolError

AGENT = "/bin/ptagent"
EINVAL, ENOENT, E2BIG, ENOMEM, EFAULT, ETIMEDOUT = 22, 2, 7, 12, 14, 110
MAX_PAGES = 262144
MAX_REQUEST = 65536


@dataclass(frozen=True)
class Case:
    """One command: argv bytes for the CLI, or ``stdin`` for ``ptagent raw`` (the wire)."""

    label: str
    args: tuple[bytes, ...]
    stdin: bytes | None = None  # `ptagent raw` request bytes
    errno: int | None = None  # the errno the reply must carry, when one is certain


def _junk(rng: random.Random, n: int, *, nul: bool = False) -> bytes:
    """``n`` random bytes after a 0xff (so never a number, a name or a protection), not
    ending in a newline (the shell's $(...) would drop it)."""
    b = b"\xff" + rng.randbytes(n - 1)
    if not nul:
        b = b.replace(b"\0", b"\x01")
    return b[:-1] + b"\x0b" if b.endswith(b"\n") else b


def _bad_number(rng: random.Random) -> bytes:
    return rng.choice([
        b"", b"0", b"-1", b"-0", b"5 ", b"1e3", b"0x", b"0x40001", b"262145",
        b"18446744073709551616", b"99999999999999999999999999", b"abc", b"1.5", b"+",
        b"0b101", b"\xff\xfe", str(rng.randrange(MAX_PAGES + 1, 1 << 64)).encode(),
        _junk(rng, rng.randrange(1, 24)),
    ])


def _bad_id(rng: random.Random) -> bytes:
    """An object id no daemon object has (ids count up from 1; the run holds < 10^6)."""
    if rng.random() < 0.5:
        return str(rng.randrange(10**6, 1 << 64)).encode()
    return rng.choice([b"0", b"-1", b"", b"x", b"1x", b"18446744073709551616"])


def _bad_prot(rng: random.Random) -> bytes:
    return rng.choice([b"", b"rwz", b"RW", b"r w", b"nonee", b"q", b"rw\xff", b"+rw",
                       _junk(rng, rng.randrange(1, 12))])


def _overlong(rng: random.Random) -> bytes:
    digits = rng.randbytes(rng.randrange(5000, 100000))
    return b"x" + digits.translate(bytes(ord("a") + i % 26 for i in range(256)))


def _wire(rng: random.Random) -> Case:
    kind = rng.randrange(6)
    if kind == 0:
        return Case("raw junk", (b"raw",), _junk(rng, rng.randrange(1, 2000), nul=True),
                    EINVAL)
    if kind == 1:
        return Case("raw over 64 KiB", (b"raw",),
                    _junk(rng, rng.randrange(MAX_REQUEST, 3 * MAX_REQUEST), nul=True), E2BIG)
    if kind == 2:
        return Case("raw empty", (b"raw",), b"", EINVAL)
    if kind == 3:
        name = rng.choice([b"info", b"kread", b"memblocks", b"serve", b"raw", b"insmod"])
        return Case("raw non-held", (b"raw",), name + b"\0", EINVAL)
    if kind == 4:  # 300 arguments: the daemon keeps 255 and says `ping` takes none
        return Case("raw many args", (b"raw",), b"ping\0" * 300, EINVAL)
    return Case("raw held with junk", (b"raw",),
                rng.choice([b"ping", b"list", b"canary"]) + b"\0" + _junk(rng, 40) + b"\0",
                EINVAL)


def malformed(rng: random.Random, n: int, *, held_id: int, huge_pages: int) -> list[Case]:
    """``n`` commands that must each be refused. ``held_id``: a live object of the daemon (for
    bad-protection mprotects); ``huge_pages``: a page count above what the guest can hold
    (0: skip that kind)."""
    gens: list[Callable[[], Case]] = [
        lambda: Case("unknown command", (rng.choice([
            b"PING", b"pingg", b"", b"--help", b"-d", b"secret", b"release_all", b"\xff",
            _junk(rng, rng.randrange(1, 64))]),), errno=EINVAL),
        lambda: Case("overlong command", (_overlong(rng),), errno=EINVAL),
        lambda: Case("bad N", (rng.choice([b"secretmem", b"pin"]), _bad_number(rng)),
                     errno=EINVAL),
        lambda: Case("mmap bad N", (b"mmap", _bad_number(rng), b"rw"), errno=EINVAL),
        lambda: Case("mmap bad prot", (b"mmap", str(rng.randrange(1, 5)).encode(),
                                       _bad_prot(rng)), errno=EINVAL),
        lambda: Case("arg count", rng.choice([
            (b"ping", b"x"), (b"list", b"1"), (b"canary", b"1"), (b"secretmem",),
            (b"secretmem", b"1", b"2"), (b"mmap", b"1"), (b"mprotect",), (b"release",),
            (b"release", b"1", b"2"), (b"info", b"x"), (b"memblocks", b"x"), (b"kread",),
            (b"kread", b"1"), (b"rmmod",), (b"insmod",), (b"offline",), (b"online",),
            (b"serve", b"x"), (b"serve", b"-d", b"x"), (b"raw", b"x"),
            (b"pin", b"1", b"2")]), errno=EINVAL),
        lambda: Case("release unknown id", (b"release", _bad_id(rng)), errno=ENOENT),
        lambda: Case("mprotect unknown id", (b"mprotect", _bad_id(rng), b"r"),
                     errno=ENOENT),
        lambda: Case("mprotect bad prot", (b"mprotect", str(held_id).encode(),
                                           _bad_prot(rng)), errno=EINVAL),
        lambda: Case("kread bad VA", (b"kread", _bad_number(rng), b"8"), errno=None),
        lambda: Case("kread bad LEN", (b"kread", b"0xffffffff81000000", rng.choice(
            [b"0", b"4097", b"-1", b"99999999999", _bad_number(rng)])), errno=EINVAL),
        lambda: Case("kread unmapped", (b"kread", rng.choice([b"0", b"8", b"0x1000"]), b"8"),
                     errno=EFAULT),
        lambda: Case("memory block", (rng.choice([b"online", b"offline"]), rng.choice([
            str(rng.randrange(10**6, 10**12)).encode(), b"x", b"-1", b"", _junk(rng, 8),
            b"18446744073709551616"])), errno=None),
        lambda: Case("online type", (b"online", str(rng.randrange(10**6, 10**9)).encode(),
                                     rng.choice([b"on", b"offline_movable", b"", b"\xff"])),
                     errno=EINVAL),
        lambda: Case("insmod missing", (b"insmod", b"/nonexistent/" + _junk(rng, 8)),
                     errno=None),
        lambda: Case("insmod not a module", (b"insmod", rng.choice([b"/", b"/bin/ptagent",
                                                                     b"/dev/null"])),
                     errno=None),
        lambda: Case("insmod params too long", (b"insmod", b"/nonexistent.ko",
                                                b"p=" + _overlong(rng)[:6000]), errno=E2BIG),
        lambda: Case("rmmod bad name", (b"rmmod", rng.choice([
            b"", b"a/b", b"x" * rng.randrange(64, 300), b"/"])), errno=EINVAL),
        lambda: Case("rmmod absent", (b"rmmod", b"ptlab_absent_%d" % rng.randrange(10**6)),
                     errno=ENOENT),
        lambda: Case("junk args", (rng.choice([b"secretmem", b"mmap", b"release", b"kread",
                                               b"mprotect", b"list", b"ping", b"canary"]),
                                   *(_junk(rng, rng.randrange(1, 200))
                                     for _ in range(rng.randrange(3, 6)))), errno=EINVAL),
        lambda: _wire(rng),
    ]
    if huge_pages:
        gens.append(lambda: Case("huge N", (rng.choice([b"secretmem", b"pin"]), str(
            rng.randrange(huge_pages, MAX_PAGES + 1)).encode()), errno=ENOMEM))
        gens.append(lambda: Case("mmap huge N", (b"mmap", str(rng.randrange(
            huge_pages, MAX_PAGES + 1)).encode(), b"rw"), errno=ENOMEM))
    return [rng.choice(gens)() for _ in range(n)]


def _sh_arg(b: bytes) -> str:
    """A shell word that is exactly ``b`` (no NUL; a trailing newline would be lost by $(...),
    so it is written as an escape inside printf, which keeps it)."""
    if b and all(32 <= c < 127 for c in b) and b"'" not in b:
        return "'" + b.decode() + "'"
    if not b:
        return "''"
    esc = "".join(f"\\0{c:03o}" for c in b)
    return f"\"$(printf %b '{esc}')\""


def script(cases: Sequence[Case], first: int) -> str:
    """The shell script running ``cases`` (numbered from ``first``): per case a line
    ``@@ INDEX STATUS`` and the hex of its stdout."""
    lines = ["o=$(mktemp)"]
    for i, c in enumerate(cases, first):
        if c.stdin is not None:
            b64 = base64.b64encode(c.stdin).decode()
            run = f"echo {b64} | base64 -d | {AGENT} raw"
        else:
            run = " ".join([AGENT, *map(_sh_arg, c.args)]) + " </dev/null"
        lines.append(f"{run} >$o 2>/dev/null; echo \"@@ {i} $?\"; od -An -v -tx1 $o | "
                     "tr -d ' \\n'; echo")
    lines.append("rm -f $o")
    return "\n".join(lines) + "\n"


@dataclass
class Outcome:
    case: Case
    clean: bool
    detail: str  # the errno, or what was wrong


def judge(case: Case, status: int, stdout: str) -> Outcome:
    """Clean: the error object with exit status 1 (and the expected errno, if any)."""
    args = [a.decode(errors="replace") for a in case.args] or [""]
    try:
        reply = parse_reply(args, status, stdout)
    except AgentError as e:
        if case.errno is not None and e.errno != case.errno:
            return Outcome(case, False, f"errno {e.errno} ({e}), expected {case.errno}")
        return Outcome(case, True, f"errno {e.errno}")
    except AgentProtocolError as e:
        return Outcome(case, False, f"not the error object: {e}")
    return Outcome(case, False, f"a success reply: {str(reply)[:200]}")


def parse_batch(cases: Sequence[Case], first: int, out: str) -> list[Outcome]:
    """Outcomes of one batch's output (a case without its ``@@`` line is not clean)."""
    seen: dict[int, tuple[int, str]] = {}
    lines = out.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("@@ "):
            _, idx, status = line.split()
            hexed = lines[k + 1] if k + 1 < len(lines) else ""
            seen[int(idx)] = (int(status), bytes.fromhex(hexed).decode(errors="replace"))
    results = []
    for i, c in enumerate(cases, first):
        if i not in seen:
            results.append(Outcome(c, False, "no output (the batch died)"))
        else:
            results.append(judge(c, *seen[i]))
    return results


def stall_script(n: int, seconds: int) -> str:
    """Start ``n`` clients that connect and never complete their request (background);
    each writes its reply to /run/ptlab-stall.<i>."""
    return "".join(f"(sleep {seconds} | {AGENT} raw > /run/ptlab-stall.{i} 2>&1; "
                   f"echo \"$?\" > /run/ptlab-stall.{i}.rc) </dev/null >/dev/null 2>&1 &\n"
                   for i in range(n))


def collect_stalls(n: int) -> str:
    """Print the stalled clients' exit statuses and replies as :func:`script` prints its."""
    return "".join(f"echo \"@@ {i} $(cat /run/ptlab-stall.{i}.rc 2>/dev/null || echo 255)\"; "
                   f"od -An -v -tx1 /run/ptlab-stall.{i} | tr -d ' \\n'; echo; "
                   f"rm -f /run/ptlab-stall.{i} /run/ptlab-stall.{i}.rc\n" for i in range(n))


def stall_cases(n: int) -> list[Case]:
    """The cases :func:`collect_stalls` reports (each must be ETIMEDOUT)."""
    return [Case("stalled client", (b"raw",), b"", ETIMEDOUT) for _ in range(n)]
