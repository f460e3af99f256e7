"""A minimal GDB remote-serial-protocol client for QEMU's gdbstub: read registers by name.

QEMU 7.2 facts this relies on (see GUEST-FACTS): the stub stays in ack mode, its packet size
is 0x1000, target.xml pulls register features in with ``xi:include`` (an unbound prefix, so
it is not namespace-well-formed XML) and system registers carry explicit ``regnum``s.
Connecting pauses the VM; closing the socket without ``D`` leaves it paused (``D`` resumes).
Registers outside the core set (system registers) read as empty until the client has read
target.xml on this connection, so every connection reads it, even with a known register map.
"""

from __future__ import annotations

import re
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path


class GdbError(RuntimeError):
    """Protocol failure, timeout, an error reply, or an unknown register."""


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def escape(payload: bytes) -> bytes:
    """Escape the protocol's special bytes ($ # } *) as ``}`` + byte ^ 0x20."""
    out = bytearray()
    for b in payload:
        if b in b"$#}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """``$payload#cs`` with special bytes escaped."""
    body = escape(payload)
    return b"$" + body + b"#%02x" % checksum(body)


def decode(body: bytes) -> bytes:
    """Undo escaping and run-length encoding (``x*N``: N - 29 more copies of x)."""
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        b = body[i]
        if b == 0x7D:  # '}'
            if i + 1 >= n:
                raise GdbError("packet ends inside an escape")
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif b == 0x2A:  # '*'
            if not out or i + 1 >= n:
                raise GdbError("run-length marker without a byte to repeat")
            count = body[i + 1] - 29
            if count < 0:
                raise GdbError(f"bad run-length count byte {body[i + 1]:#x}")
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


class PacketReader:
    """Splits a byte stream into acks and framed packets, verifying checksums."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> tuple[str, bytes] | None:
        """("+"|"-", b"") for an ack, ("packet", body) for a good packet, ("bad", body) for a
        bad checksum, or None if more bytes are needed."""
        while self.buf:
            c = self.buf[0]
            if c in b"+-":
                del self.buf[0]
                return chr(c), b""
            if c != 0x24:  # skip noise until '$'
                del self.buf[0]
                continue
            end = self.buf.find(b"#")
            if end < 0 or len(self.buf) < end + 3:
                return None
            body, cs = bytes(self.buf[1:end]), bytes(self.buf[end + 1 : end + 3])
            del self.buf[: end + 3]
            try:
                ok = int(cs, 16) == checksum(body)
            except ValueError:
                ok = False
            return ("packet", body) if ok else ("bad", body)
        return None


@dataclass(frozen=True, slots=True)
class Register:
    name: str
    regnum: int
    bitsize: int
    feature: str


_INCLUDE = re.compile(r"<(?:\w+:)?include\s+href=\"([^\"]+)\"")
_FEATURE = re.compile(r"<feature\s+name=\"([^\"]+)\"")
_REGTAG = re.compile(r"<reg\s([^>]*?)/?>")
_ATTR = re.compile(r"(\w+)=\"([^\"]*)\"")


def xml_includes(xml: str) -> list[str]:
    """Annex names a target description pulls in with ``xi:include``, in order."""
    return _INCLUDE.findall(xml)


def parse_registers(documents: list[str], start: int = 0) -> dict[str, Register]:
    """Registers of target-description documents, numbered as GDB does: a ``regnum``
    attribute sets the number, otherwise each register follows the previous one."""
    regs: dict[str, Register] = {}
    nxt = start
    for doc in documents:
        fm = _FEATURE.search(doc)
        feature = fm.group(1) if fm else ""
        for tag in _REGTAG.finditer(doc):
            attrs = dict(_ATTR.findall(tag.group(1)))
            if "name" not in attrs:
                raise GdbError(f"<reg> without a name in feature {feature!r}")
            num = int(attrs["regnum"]) if "regnum" in attrs else nxt
            regs[attrs["name"]] = Register(attrs["name"], num, int(attrs.get("bitsize", 64)),
                                           feature)
            nxt = num + 1
    return regs


# QEMU's x86-64 stub numbers the control registers after the 6 segment selectors and
# fs_base, gs_base, k_gs_base (target/i386/gdbstub.c: IDX_CTL_REGS = IDX_SEG_REGS +
# IDX_NB_SEG); QEMU 7.2's i386-64bit.xml lists ss_base, ds_base, es_base there too, so
# numbering its <reg>s gives cr3 = 32 where the stub serves EFER. Callers check these
# against HMP ``info registers`` before writing one.
X86_64_QEMU_CONTROL = {name: Register(name, 27 + i, 64, "qemu control")
                       for i, name in enumerate(("cr0", "cr2", "cr3", "cr4", "cr8", "efer"))}


class GdbClient:
    """A connection to a gdbstub unix socket (or TCP host:port, with TCP_NODELAY)."""

    def __init__(
        self,
        address: Path | str | tuple[str, int],
        *,
        timeout: float = 10.0,
        known: dict[str, Register] | None = None,
    ) -> None:
        """Connect; ``known`` is a register map from an earlier connection to the same stub
        (saves fetching the feature documents; target.xml itself is still read)."""
        self.timeout = timeout
        self.reader = PacketReader()
        self.packet_size = 0x1000
        try:
            if isinstance(address, tuple):
                self.sock = socket.create_connection(address, timeout=timeout)
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            else:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(address))
        except OSError as e:
            raise GdbError(f"cannot connect to gdbstub {address}: {e}") from None
        self._registers: dict[str, Register] | None = None
        self._known = known
        features = self.request(b"qSupported:xmlRegisters=aarch64,i386;multiprocess+")
        m = re.search(rb"PacketSize=([0-9a-fA-F]+)", features)
        if m:
            self.packet_size = int(m.group(1), 16)

    def _recv_event(self, deadline: float) -> tuple[str, bytes]:
        while (ev := self.reader.next()) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise GdbError(f"gdbstub: no reply within {self.timeout} s")
            data = self.sock.recv(65536)
            if not data:
                raise GdbError("gdbstub closed the connection")
            self.reader.feed(data)
        return ev

    def request(self, payload: bytes) -> bytes:
        """Send one packet (retransmitting on NAK) and return the decoded reply."""
        deadline = time.monotonic() + self.timeout
        pkt = frame(payload)
        for _ in range(5):
            self.sock.sendall(pkt)
            ev, _body = self._recv_event(deadline)
            while ev == "packet":  # a stray stop reply before our ack: ack it, keep waiting
                self.sock.sendall(b"+")
                ev, _body = self._recv_event(deadline)
            if ev == "+":
                break
        else:
            raise GdbError(f"gdbstub did not acknowledge {payload[:40]!r}")
        while True:
            ev, body = self._recv_event(deadline)
            if ev == "packet":
                self.sock.sendall(b"+")
                reply = decode(body)
                if re.fullmatch(rb"E[0-9a-fA-F]{2}", reply):
                    raise GdbError(f"gdbstub error {reply.decode()} for {payload[:40]!r}")
                return reply
            if ev == "bad":
                self.sock.sendall(b"-")

    def read_xfer(self, obj: str, annex: str) -> bytes:
        """Whole qXfer object ``obj`` / ``annex`` (e.g. features, target.xml)."""
        data = bytearray()
        chunk = self.packet_size - 5
        while True:
            reply = self.request(f"qXfer:{obj}:read:{annex}:{len(data):x},{chunk:x}".encode())
            if not reply or reply[:1] not in b"ml":
                raise GdbError(f"bad qXfer reply for {annex}: {reply[:40]!r}")
            data += reply[1:]
            if reply[:1] == b"l":
                return bytes(data)
            if len(reply) == 1:
                raise GdbError(f"qXfer {annex}: empty 'm' chunk")

    def registers(self) -> dict[str, Register]:
        """All registers of the target description (target.xml and its includes)."""
        if self._registers is None:
            top = self.read_xfer("features", "target.xml").decode()  # enables sys regs
            if self._known is not None:
                self._registers = self._known
            else:
                docs = [self.read_xfer("features", a).decode() for a in xml_includes(top)]
                self._registers = parse_registers([top, *docs])
        return self._registers

    def _reg(self, name: str | Register) -> Register:
        if isinstance(name, Register):
            return name
        reg = self.registers().get(name)
        if reg is None:
            raise GdbError(f"gdbstub has no register {name!r}")
        return reg

    def read_register(self, name: str | Register) -> int:
        """Value of register ``name`` (or a :class:`Register` as the stub numbers it) of the
        current CPU (``p`` packet, target little endian)."""
        reg = self._reg(name)
        reply = self.request(b"p%x" % reg.regnum)
        try:
            raw = bytes.fromhex(reply.decode())
        except ValueError:
            raise GdbError(f"bad register reply for {reg.name}: {reply[:40]!r}") from None
        if len(raw) * 8 != reg.bitsize:
            raise GdbError(f"{reg.name}: {len(raw)} bytes, expected {reg.bitsize} bits")
        return int.from_bytes(raw, "little")

    def write_register(self, name: str | Register, value: int) -> None:
        """Set register ``name`` of the current CPU (``P`` packet, target little endian);
        the stub must answer OK (QEMU's x86 stub writes CR3 through cpu_x86_update_cr3)."""
        reg = self._reg(name)
        if not 0 <= value < 1 << reg.bitsize:
            raise GdbError(f"{reg.name}: {value:#x} does not fit {reg.bitsize} bits")
        raw = value.to_bytes(reg.bitsize // 8, "little").hex()
        reply = self.request(f"P{reg.regnum:x}={raw}".encode())
        if reply != b"OK":
            raise GdbError(f"gdbstub refused to write {reg.name}: {reply[:40]!r}")

    def read_registers(self, names: list[str]) -> dict[str, int]:
        return {n: self.read_register(n) for n in names}

    def close(self, *, detach: bool = False) -> None:
        """Close the connection; with ``detach`` send ``D`` first (which resumes the VM)."""
        try:
            if detach:
                self.request(b"D")
        except (GdbError, OSError):
            pass
        finally:
            self.sock.close()

    def __enter__(self) -> GdbClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
