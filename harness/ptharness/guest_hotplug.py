"""Memory hotplug of a running guest (mixed into :class:`~.guest.Guest`): x86 pc-dimm
add/remove with shared-file backends, arm64 virtio-mem resize."""

from __future__ import annotations

import time
from typing import Any

from .errors import GuestError
from .profiles import VIRTIO_MEM_ID, VIRTIO_MEM_MB
from .qmp import MonitorError


class HotplugMixin:
    """What :class:`~.guest.Guest` provides: profile, hotplug, rundir, memory, qmp, _monitor,
    _dimms, _dimm_seq, _check_alive, _error."""

    profile: Any
    hotplug: bool
    memory: Any
    _monitor: Any
    _dimms: dict[str, tuple[str, int]]
    _dimm_seq: int

    def plug_dimm(self, size_mb: int) -> str:
        """x86: add a ``size_mb`` pc-dimm backed by a shared file; return its device id."""
        if self.profile.board.hotplug != "pc-dimm" or not self.hotplug:
            raise GuestError("plug_dimm needs a pc-dimm (x86) guest started with hotplug=True")
        if size_mb <= 0 or size_mb % 128:
            raise ValueError(f"DIMM size must be a positive multiple of 128 MiB, not {size_mb}")
        self._dimm_seq += 1
        dev, backend = f"dimm{self._dimm_seq}", f"dimm{self._dimm_seq}-mem"
        path = self.rundir / backend
        size = size_mb << 20
        self.qmp("object-add", qom_type="memory-backend-file", id=backend, size=size,
                 mem_path=str(path), share=True)
        try:
            self.qmp("device_add", driver="pc-dimm", id=dev, memdev=backend)
        except BaseException:
            self.qmp("object-del", id=backend)
            path.unlink(missing_ok=True)
            raise
        mem = self.memory
        mem.map_file(backend, path, size)
        path.unlink(missing_ok=True)
        addr = next(int(d["data"]["addr"]) for d in self.qmp("query-memory-devices")
                    if d.get("data", {}).get("id") == dev)
        mem.add_range(addr, size, backend)
        self._dimms[dev] = (backend, size)
        return dev

    def dimm_address(self, dev: str) -> int:
        for d in self.qmp("query-memory-devices"):
            if d.get("data", {}).get("id") == dev:
                return int(d["data"]["addr"])
        raise KeyError(dev)

    def unplug_dimm(self, dev: str, timeout: float = 30) -> None:
        """x86: device_del a DIMM (the guest must have offlined it) and wait for DEVICE_DELETED."""
        if dev not in self._dimms:
            raise KeyError(f"no DIMM {dev!r} plugged by this guest")
        assert self._monitor is not None
        backend, _size = self._dimms[dev]
        self._monitor.clear_events()
        self.qmp("device_del", id=dev)
        try:
            self._monitor.wait_event("DEVICE_DELETED", timeout,
                                     lambda d: d.get("device") == dev)
        except MonitorError as e:
            self._check_alive()
            raise self._error(f"unplug {dev}: {e}") from None
        self.qmp("object-del", id=backend)
        self.memory.drop(backend)
        del self._dimms[dev]

    def virtio_mem_resize(self, size_mb: int, timeout: float = 30) -> None:
        """arm64: ask the virtio-mem device for ``size_mb`` plugged MiB and wait until it is."""
        if self.profile.board.hotplug != "virtio-mem" or not self.hotplug:
            raise GuestError("virtio_mem_resize needs a virtio-mem (arm64) guest started with "
                             "hotplug=True")
        if not 0 <= size_mb <= VIRTIO_MEM_MB:
            raise ValueError(f"virtio-mem size must be within 0..{VIRTIO_MEM_MB} MiB")
        path = f"/machine/peripheral/{VIRTIO_MEM_ID}"
        want = size_mb << 20
        self.qmp("qom-set", path=path, property="requested-size", value=want)
        deadline = time.monotonic() + timeout
        while (size := int(self.qmp("qom-get", path=path, property="size"))) != want:
            if time.monotonic() > deadline:
                raise self._error(f"virtio-mem stuck at {size >> 20} MiB, requested {size_mb}")
            time.sleep(0.05)
