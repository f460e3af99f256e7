"""Smoke test of a built image: boot it under TCG QEMU, wait for PTLAB-READY, SSH in with
the host key verified, run the agent. Prints timings. Not the harness (ptharness.guest):
a self-contained check for the image build.

Usage: python -m ptharness.image_smoke x86_64|arm64 [agent command ...]
"""

from __future__ import annotations

import base64
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import paramiko

from ptharness.image import Image, ImageError, ensure_image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(console: io.BytesIO, n: int = 30) -> str:
    return "\n".join(console.getvalue().decode(errors="replace").splitlines()[-n:])


def qemu_command(image: Image, port: int, pubkey_line: str, *, mem_mb: int = 1024,
                 extra_append: str = "") -> list[str]:
    key = base64.b64encode(pubkey_line.encode()).decode()
    net = ["-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:22",
           "-device", "virtio-net-pci,netdev=n0"]
    if image.arch == "x86_64":
        kernel = image.vmlinux or image.kernel
        return ["qemu-system-x86_64", "-M", "q35", "-cpu", "max", "-m", str(mem_mb),
                "-nographic", "-no-reboot", "-kernel", str(kernel), "-initrd", str(image.initrd),
                "-append", f"console=ttyS0 secretmem.enable=1 panic=-1 ptlab.key={key} "
                f"{extra_append}".strip(), *net]
    return ["qemu-system-aarch64", "-M", "virt", "-cpu", "max,pauth-impdef=on", "-m",
            str(mem_mb), "-nographic", "-no-reboot", "-kernel", str(image.kernel), "-initrd",
            str(image.initrd), "-append", f"console=ttyAMA0 secretmem.enable=1 panic=-1 "
            f"ptlab.key={key} {extra_append}".strip(), *net]


def new_client_key() -> paramiko.Ed25519Key:
    """A fresh Ed25519 client key (paramiko cannot generate one itself)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()).decode()
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem))


def smoke(arch: str, commands: list[list[str]], timeout: float = 120,
          image: Image | None = None) -> dict:
    if image is None:
        image = ensure_image(arch, progress=lambda s: print(s, file=sys.stderr))
    client_key = new_client_key()
    rundir = Path(tempfile.mkdtemp(prefix="ptlab-smoke-"))
    proc = None
    try:
        pub = f"{client_key.get_name()} {client_key.get_base64()}"
        port = _free_port()
        cmd = qemu_command(image, port, pub, extra_append=os.environ.get("PTLAB_SMOKE_APPEND", ""))
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        console = io.BytesIO()
        ready = None
        assert proc.stdout is not None
        while ready is None:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("no PTLAB-READY within timeout:\n" + _tail(console))
            r, _, _ = select.select([proc.stdout], [], [], 0.5)
            if r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    raise RuntimeError("QEMU exited before PTLAB-READY:\n" + _tail(console))
                console.write(chunk)
                if b"PTLAB-READY" in console.getvalue():
                    ready = time.monotonic() - t0
        host_type, host_b64 = image.host_key_pub.split()[:2]
        host_key = paramiko.Ed25519Key(data=base64.b64decode(host_b64))
        ssh = paramiko.SSHClient()
        ssh.get_host_keys().add(f"[127.0.0.1]:{port}", host_type, host_key)
        ssh.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            ssh.connect("127.0.0.1", port=port, username="root", pkey=client_key,
                        allow_agent=False, look_for_keys=False, timeout=20, banner_timeout=20)
        except (OSError, paramiko.SSHException) as e:
            raise RuntimeError(f"SSH failed: {e}\n{_tail(console)}") from None
        first = None
        replies = []
        for c in commands:
            t1 = time.monotonic()
            _, out, err = ssh.exec_command("/bin/ptagent " + " ".join(c), timeout=60)
            text = out.read().decode()
            rc = out.channel.recv_exit_status()
            if first is None:
                first = time.monotonic() - t0
            replies.append({"cmd": c, "rc": rc, "s": round(time.monotonic() - t1, 3),
                            "reply": json.loads(text) if text.strip() else None,
                            "stderr": err.read().decode()})
        ssh.close()
        return {"arch": arch, "boot_to_ready_s": round(ready, 2),
                "boot_to_first_reply_s": round(first or 0, 2), "replies": replies,
                "console_tail": console.getvalue().decode(errors="replace")[-1500:]}
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            if proc.stdout:
                proc.stdout.close()
        shutil.rmtree(rundir, ignore_errors=True)


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m ptharness.image_smoke x86_64|arm64 [cmd args ...]",
              file=sys.stderr)
        return 2
    cmds = [sys.argv[2:]] if len(sys.argv) > 2 else [["ping"], ["info"], ["secretmem", "4"],
                                                      ["canary"], ["memblocks"]]
    try:
        res = smoke(sys.argv[1], cmds)
    except (ImageError, RuntimeError, OSError, paramiko.SSHException) as e:
        print(f"smoke failed: {e}", file=sys.stderr)
        return 1
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
