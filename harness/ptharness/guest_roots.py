"""Registers and page-table roots of a running guest (mixed into :class:`~.guest.Guest`):
control registers over HMP or the gdbstub (the profile's board says which), VMCOREINFO read
from guest RAM, and the kernel root and format derived from both by the rules of
:mod:`ptlab.arch` (the same functions the ``ptlab`` CLI uses on dumps)."""

from __future__ import annotations

from typing import Any

from ptlab.arch import ArchError, arch_for
from ptlab.arch import kernel_root as arch_kernel_root
from ptlab.formats import Format
from ptlab.memory import MemoryError_
from ptlab.memory.elfcore import parse_notes
from ptlab.memory.vmcoreinfo import VmcoreInfo, VmcoreInfoError

from . import agent_reply
from .gdbstub import GdbClient, GdbError
from .qmp import parse_info_registers


class RootsMixin:
    """What :class:`~.guest.Guest` provides: profile, memory, hmp, ssh, cont, running, alive,
    _paths, _info, _vmcoreinfo, _gdb_regs, _check_alive, _error."""

    profile: Any
    memory: Any
    _paths: Any
    _info: dict[str, Any] | None
    _vmcoreinfo: VmcoreInfo | None
    _gdb_regs: Any

    def registers(self) -> dict[str, int]:
        """x86: cr0, cr2, cr3, cr4, efer, rip, cpl (HMP); arm64: ttbr0_el1, ttbr1_el1, tcr_el1,
        cpsr, pc (gdbstub; EL = cpsr >> 2 & 3). The VM's run state is left as it was."""
        board = self.profile.board
        if board.registers == "hmp":
            return parse_info_registers(self.hmp("info registers"))
        self._check_alive()
        assert self._paths is not None
        was_running = self.running
        try:
            with GdbClient(self._paths.gdb, known=self._gdb_regs) as gdb:  # pauses the VM
                regs = gdb.read_registers(list(board.gdb_registers))
                self._gdb_regs = gdb.registers()
        except GdbError as e:
            raise self._error(f"gdbstub: {e}") from None
        finally:
            if was_running and self.alive:
                self.cont()
        return {k.lower(): v for k, v in regs.items()}

    def vmcoreinfo(self) -> VmcoreInfo:
        """The kernel's VMCOREINFO note, read from guest RAM at the address the guest reports."""
        if self._vmcoreinfo is None:
            pa, size = self._vmcoreinfo_location()
            try:
                notes = parse_notes(self.memory.read(pa, size), where="vmcoreinfo note")
            except (MemoryError_, ValueError) as e:
                raise self._error(f"VMCOREINFO note at PA {pa:#x}+{size:#x}: {e}") from None
            for note in notes:
                if note.name == "VMCOREINFO":
                    self._vmcoreinfo = VmcoreInfo(note.desc)
                    break
            else:
                raise self._error(f"no VMCOREINFO note at PA {pa:#x}")
        return self._vmcoreinfo

    def _vmcoreinfo_location(self) -> tuple[int, int]:
        """(PA, size) of the VMCOREINFO note: from an ``info`` reply already at hand (fetching
        one needs a running guest), else from the guest's /sys/kernel/vmcoreinfo."""
        if self._info is not None:
            loc = agent_reply.vmcoreinfo_location(self._info)
            if loc is None:
                raise self._error("the guest kernel has no /sys/kernel/vmcoreinfo (agent info)")
            return loc
        status, out, _ = self.ssh("cat /sys/kernel/vmcoreinfo")
        fields = out.split()
        if status != 0 or len(fields) != 2:
            raise self._error(f"cannot read /sys/kernel/vmcoreinfo (status {status}): {out!r}")
        try:
            return int(fields[0], 16), int(fields[1], 16)
        except ValueError:
            raise self._error(f"/sys/kernel/vmcoreinfo is not 'PA SIZE' in hex: {out!r}") from None

    def kernel_root(self) -> int:
        """PA of the kernel's root table from VMCOREINFO, checked against the live registers
        (:func:`ptlab.arch.kernel_root`)."""
        regs = self.registers()
        try:
            root, _why = arch_kernel_root(arch_for(self.profile.arch), self.vmcoreinfo(), regs,
                                          mem=self.memory, isolation=self.profile.kpti)
        except VmcoreInfoError as e:
            raise self._error(f"VMCOREINFO: {e}") from None
        except ArchError as e:
            raise self._error(str(e)) from None
        return root

    def kernel_format(self) -> Format:
        """The kernel half's format from the live registers (x86 CR4.LA57, arm64 TCR_EL1),
        cross-checked with VMCOREINFO (:meth:`ptlab.arch.ArchOps.format_from`)."""
        try:
            fmt, _why = arch_for(self.profile.arch).format_from(self.registers(),
                                                                  self.vmcoreinfo())
        except (ArchError, VmcoreInfoError) as e:
            raise self._error(str(e)) from None
        return fmt
