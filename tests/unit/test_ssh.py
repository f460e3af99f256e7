"""SSH session against an in-process paramiko server: key auth, host-key pinning, timeouts."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

import paramiko
import pytest
from ptharness.ssh import (
    HostKeyMismatch,
    Session,
    SshError,
    generate_key,
    key_param,
    parse_host_key,
)


class Server(paramiko.ServerInterface):
    def __init__(self, allowed: paramiko.PKey) -> None:
        self.allowed = allowed
        self.command = threading.Event()
        self.cmd = b""

    def check_auth_publickey(self, username, key):
        ok = username == "root" and key.asbytes() == self.allowed.asbytes()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_auth_password(self, username, password):
        return paramiko.AUTH_FAILED

    def get_allowed_auths(self, username):
        return "publickey"

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_UNKNOWN_CHANNEL_TYPE

    def check_channel_exec_request(self, channel, command):
        # paramiko sends the exec reply after this returns: run the command a moment later,
        # as a real server does, so the channel is not closed before the client sees the reply
        t = threading.Timer(0.05, self.execute, args=(channel, command))
        t.daemon = True
        t.start()
        return True

    @staticmethod
    def execute(chan: paramiko.Channel, command: bytes) -> None:
        words = command.decode().split()
        try:
            if words[0] == "echo":
                chan.sendall(" ".join(words[1:]).encode() + b"\n")
                chan.sendall_stderr(b"warn\n")
                chan.send_exit_status(0)
            elif words[0] == "exit":
                chan.send_exit_status(int(words[1]))
            elif words[0] == "sleep":
                time.sleep(float(words[1]))
                chan.send_exit_status(0)
            chan.close()
        except (OSError, EOFError):
            pass


@pytest.fixture
def sshd():
    """(port, host key line, client key, transports) of a listening test server."""
    client_key, _pub = generate_key()
    host_key = paramiko.Ed25519Key.from_private_key(io.StringIO(_private_pem()))
    host_line = f"ssh-ed25519 {host_key.get_base64()} host"
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    transports: list[paramiko.Transport] = []
    stop = threading.Event()

    def serve():
        lsock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lsock.accept()
            except OSError:
                continue
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            transports.append(t)
            try:
                t.start_server(server=Server(client_key))
            except (paramiko.SSHException, EOFError):
                pass

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    yield lsock.getsockname()[1], host_line, client_key, transports
    stop.set()
    th.join(2)
    for t in transports:
        t.close()
    lsock.close()


def _private_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()


def test_generate_key_and_param():
    key, pub = generate_key()
    assert pub.startswith("ecdsa-sha2-nistp256 AAAA")
    assert pub.split()[1] == key.get_base64()
    assert base64.b64decode(key_param(pub)).decode() == pub
    assert parse_host_key(pub).asbytes() == key.asbytes()
    with pytest.raises(SshError):
        parse_host_key("garbage")


def test_run_commands(sshd):
    port, host_line, key, _ = sshd
    s = Session.connect(port, key, host_line, deadline=time.monotonic() + 10)
    assert s.run("echo hello world") == (0, "hello world\n", "warn\n")
    assert s.run("exit 3")[0] == 3
    t = time.monotonic()
    with pytest.raises(SshError, match="did not finish"):
        s.run("sleep 5", timeout=0.3)
    assert time.monotonic() - t < 2
    s.close()


def test_abort_unblocks_a_running_command(sshd):
    port, host_line, key, _ = sshd
    s = Session.connect(port, key, host_line, deadline=time.monotonic() + 10)
    threading.Timer(0.3, s.abort).start()
    t = time.monotonic()
    with pytest.raises(SshError):
        s.run("sleep 10", timeout=20)
    assert time.monotonic() - t < 3


def test_wrong_host_key_refused(sshd):
    port, _host_line, key, _ = sshd
    _other, other_pub = generate_key()
    with pytest.raises(HostKeyMismatch):
        Session.connect(port, key, other_pub, deadline=time.monotonic() + 10)


def test_wrong_client_key_refused(sshd):
    port, host_line, _key, _ = sshd
    stranger, _ = generate_key()
    with pytest.raises(SshError, match="authentication"):
        Session.connect(port, stranger, host_line, deadline=time.monotonic() + 10)


def test_connect_gives_up_at_deadline():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    key, pub = generate_key()
    t = time.monotonic()
    with pytest.raises(SshError, match="not ready"):
        Session.connect(port, key, pub, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - t < 3
    with pytest.raises(SshError, match="died"):
        Session.connect(port, key, pub, deadline=time.monotonic() + 5, alive=lambda: False)


def test_late_channel_warning_is_dropped(caplog):
    """paramiko's warning about a channel opened after our open timed out (a resumed guest) is
    dropped; its other transport warnings still show."""
    import logging

    log = logging.getLogger("paramiko.transport")
    with caplog.at_level(logging.WARNING, logger="paramiko.transport"):
        log.warning("Success for unrequested channel! [??]")
        log.warning("Oops, unhandled type 99")
    assert [r.getMessage() for r in caplog.records] == ["Oops, unhandled type 99"]
