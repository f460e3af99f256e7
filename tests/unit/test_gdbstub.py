"""gdbstub client: packet codec, stream splitting, target-description parsing, and a fake stub."""

from __future__ import annotations

import socket
import threading

import pytest
from ptharness.gdbstub import (
    GdbClient,
    GdbError,
    PacketReader,
    checksum,
    decode,
    escape,
    frame,
    parse_registers,
    xml_includes,
)

TARGET = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd"><target>'
    "<architecture>aarch64</architecture><xi:include href=\"aarch64-core.xml\"/>"
    '<xi:include href="system-registers.xml"/></target>'
)
CORE = (
    '<feature name="org.gnu.gdb.aarch64.core"><reg name="x0" bitsize="64"/>'
    '<reg name="x1" bitsize="64"/><reg name="pc" bitsize="64" regnum="32"/>'
    '<reg name="cpsr" bitsize="32"/></feature>'
)
SYSREGS = (
    '<feature name="org.qemu.gdb.arm.sys.regs">'
    '<reg name="TTBR0_EL1" bitsize="64" regnum="171" group="cp_regs"/>'
    '<reg name="TCR_EL1" bitsize="64" regnum="174" group="cp_regs"/>'
    '<reg name="TTBR1_EL1" bitsize="64" regnum="175" group="cp_regs"/></feature>'
)


def test_checksum_and_frame():
    assert checksum(b"OK") == (ord("O") + ord("K")) & 0xFF
    assert frame(b"g") == b"$g#67"
    assert frame(b"a#b") == b"$a}\x03b#" + b"%02x" % checksum(b"a}\x03b")


def test_escape_decode_roundtrip():
    raw = bytes(range(256))
    assert decode(escape(raw)) == raw


def test_decode_run_length():
    # "0* " = '0' followed by ' ' (32) - 29 = 3 more copies
    assert decode(b"0* ") == b"0000"
    assert decode(b"ab*!c") == b"abbbbbc"


@pytest.mark.parametrize("bad", [b"*a", b"ab}", b"a*"])
def test_decode_rejects_malformed(bad):
    with pytest.raises(GdbError):
        decode(bad)


def test_packet_reader_splits_stream():
    r = PacketReader()
    r.feed(b"+$O")
    assert r.next() == ("+", b"")
    assert r.next() is None  # incomplete packet
    r.feed(b"K#9a$bad#00-")
    assert r.next() == ("packet", b"OK")
    assert r.next() == ("bad", b"bad")
    assert r.next() == ("-", b"")
    assert r.next() is None


def test_includes_with_unbound_prefix():
    assert xml_includes(TARGET) == ["aarch64-core.xml", "system-registers.xml"]


def test_register_numbering():
    regs = parse_registers([TARGET, CORE, SYSREGS])
    assert regs["x0"].regnum == 0 and regs["x1"].regnum == 1
    assert regs["pc"].regnum == 32 and regs["cpsr"].regnum == 33
    assert regs["cpsr"].bitsize == 32
    assert regs["TTBR1_EL1"].regnum == 175
    assert regs["TCR_EL1"].feature == "org.qemu.gdb.arm.sys.regs"


def test_register_without_name_rejected():
    with pytest.raises(GdbError):
        parse_registers(['<feature name="f"><reg bitsize="64"/></feature>'])


class FakeStub(threading.Thread):
    """Answers like QEMU's stub in ack mode: NAKs the first packet once, RLE-encodes a reply."""

    def __init__(self, sock: socket.socket, values: dict[int, int]) -> None:
        super().__init__(daemon=True)
        self.sock, self.values = sock, values
        self.naked = False
        self.seen: list[bytes] = []

    def reply(self, body: bytes) -> None:
        self.sock.sendall(b"+" + b"$" + body + b"#%02x" % checksum(body))

    def run(self) -> None:
        reader = PacketReader()
        docs = {"target.xml": TARGET, "aarch64-core.xml": CORE, "system-registers.xml": SYSREGS}
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            reader.feed(data)
            while (ev := reader.next()) is not None:
                kind, body = ev
                if kind != "packet":
                    continue
                if not self.naked:
                    self.naked = True
                    self.sock.sendall(b"-")
                    continue
                self.seen.append(body)
                if body.startswith(b"qSupported"):
                    self.reply(b"PacketSize=40;qXfer:features:read+")
                elif body.startswith(b"qXfer:features:read:"):
                    annex, rng = body.split(b":")[3:5]
                    off, length = (int(x, 16) for x in rng.split(b","))
                    doc = docs[annex.decode()].encode()
                    part = doc[off : off + length]
                    self.reply((b"l" if off + length >= len(doc) else b"m") + escape(part))
                elif body.startswith(b"p"):
                    num = int(body[1:], 16)
                    if num not in self.values:
                        self.reply(b"E14")
                    else:
                        hexval = self.values[num].to_bytes(8, "little").hex().encode()
                        # compress runs of zeros as the stub may: "0* " is four zeros
                        self.reply(hexval.replace(b"0000", b"0* "))
                elif body.startswith(b"P"):  # P<num>=<little-endian hex>: known ones only
                    num, _, val = body[1:].partition(b"=")
                    if int(num, 16) not in self.values:
                        self.reply(b"E14")
                    else:
                        self.values[int(num, 16)] = int.from_bytes(bytes.fromhex(val.decode()),
                                                                   "little")
                        self.reply(b"OK")
                else:
                    self.reply(b"")


def test_client_writes_registers():
    """``P`` packets: the stub's value changes (read back), a refusal is an error, a value
    wider than the register never leaves the client."""
    a, b = socket.socketpair()
    stub = FakeStub(b, {175: 0x4185_8000})
    stub.start()
    client = GdbClient.__new__(GdbClient)
    client.timeout, client.reader, client.packet_size, client.sock = 5.0, PacketReader(), 0x1000, a
    client._registers, client._known = None, None
    client.write_register("TTBR1_EL1", 0x1234_5000)
    assert stub.values[175] == 0x1234_5000 == client.read_register("TTBR1_EL1")
    with pytest.raises(GdbError, match="E14"):
        client.write_register("TTBR0_EL1", 1)
    with pytest.raises(GdbError, match="does not fit"):
        client.write_register("TTBR1_EL1", 1 << 64)
    assert stub.values == {175: 0x1234_5000}
    client.close()
    b.close()


def test_client_against_fake_stub():
    a, b = socket.socketpair()
    stub = FakeStub(b, {175: 0x1A00_0041_8580_01, 174: 0x0150_01F5_B550_3510})
    stub.start()
    client = GdbClient.__new__(GdbClient)
    client.timeout, client.reader, client.packet_size, client.sock = 5.0, PacketReader(), 0x1000, a
    client._registers, client._known = None, None
    client.packet_size = 0x40  # force several qXfer chunks
    regs = client.registers()
    assert regs["TTBR1_EL1"].regnum == 175
    assert client.read_register("TTBR1_EL1") == 0x1A00_0041_8580_01
    assert client.read_register("TCR_EL1") == 0x0150_01F5_B550_3510
    with pytest.raises(GdbError, match="E14"):
        client.read_register("TTBR0_EL1")
    with pytest.raises(GdbError, match="no register"):
        client.read_register("NOPE")
    assert sum(1 for s in stub.seen if s.startswith(b"qXfer")) > 3
    client.close()
    b.close()


def test_client_timeout_on_silent_peer():
    a, b = socket.socketpair()
    client = GdbClient.__new__(GdbClient)
    client.timeout, client.reader, client.packet_size, client.sock = 0.2, PacketReader(), 0x1000, a
    client._registers, client._known = None, None
    with pytest.raises(GdbError, match="no reply"):
        client.request(b"?")
    a.close()
    b.close()


def test_connect_to_missing_socket(tmp_path):
    with pytest.raises(GdbError, match="cannot connect"):
        GdbClient(tmp_path / "nope.sock", timeout=0.5)


def test_known_register_map_still_reads_target_xml():
    """QEMU serves system registers only after target.xml was read on the connection."""
    a, b = socket.socketpair()
    stub = FakeStub(b, {175: 0x41858000})
    stub.start()
    client = GdbClient.__new__(GdbClient)
    client.timeout, client.reader, client.packet_size, client.sock = 5.0, PacketReader(), 0x1000, a
    known = parse_registers([TARGET, CORE, SYSREGS])
    client._registers, client._known = None, known
    assert client.read_register("TTBR1_EL1") == 0x41858000
    xfers = [s for s in stub.seen if s.startswith(b"qXfer")]
    assert xfers and all(b":target.xml:" in s for s in xfers)
    client.close()
    b.close()
