"""Registers and page-table roots of a running guest (mixed into :class:`~.guest.Guest`):
CR3/CR4 over QMP, TTBR/TCR over the gdbstub, VMCOREINFO read from guest RAM, and the kernel
root and format derived from it and cross-checked with the live registers."""

from __future__ import annotations

from typing import Any

from ptlab.formats import Format
from ptlab.memory import MemoryError_
from ptlab.memory.elfcore import parse_notes
from ptlab.memory.vmcoreinfo import VmcoreInfo, VmcoreInfoError

from .gdbstub import GdbClient, GdbError
from .qmp import parse_info_registers

ARM64_SYSREGS = ("TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "cpsr", "pc")
X86_CR4_LA57 = 1 << 12


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
        if self.profile.arch == "x86_64":
            return parse_info_registers(self.hmp("info registers"))
        self._check_alive()
        assert self._paths is not None
        was_running = self.running
        try:
            with GdbClient(self._paths.gdb, known=self._gdb_regs) as gdb:  # pauses the VM
                regs = gdb.read_registers(list(ARM64_SYSREGS))
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
        # Only an `info` reply already at hand: fetching one needs a running guest.
        v = (self._info or {}).get("vmcoreinfo")
        cand: list[Any] = []
        if isinstance(v, dict):
            cand = [v.get("paddr", v.get("pa", v.get("addr"))), v.get("size")]
        elif isinstance(v, list | tuple) and len(v) == 2:
            cand = list(v)
        elif isinstance(v, str) and len(v.split()) == 2:
            cand = v.split()
        try:
            pa, size = (int(x, 16) if isinstance(x, str) else int(x) for x in cand)
            return pa, size
        except (TypeError, ValueError):
            pass
        status, out, _ = self.ssh("cat /sys/kernel/vmcoreinfo")
        try:
            a, b = out.split()
            return int(a, 16), int(b, 16)
        except ValueError:
            raise self._error(f"cannot locate VMCOREINFO (agent: {v!r}, sysfs: {out!r})") from None

    def kernel_root(self) -> int:
        """PA of the kernel's root table from VMCOREINFO, checked against the live registers."""
        try:
            root = self.vmcoreinfo().kernel_root(self.profile.arch)
        except VmcoreInfoError as e:
            raise self._error(f"VMCOREINFO: {e}") from None
        regs = self.registers()
        if self.profile.arch == "x86_64":
            base = regs["cr3"] & 0x000F_FFFF_FFFF_F000
            if self.profile.kpti:
                base &= ~0x1000  # the user PGD is the kernel PGD + 4 KiB
            if base != root:
                # CR3 holds the current mm's PGD: its kernel half must be init_top_pgt's.
                mine = self.memory.read_table(base, 512)[256:]
                init = self.memory.read_table(root, 512)[256:]
                if not (mine == init).all():
                    raise self._error(f"CR3 {regs['cr3']:#x} and init_top_pgt {root:#x} "
                                      "disagree on the kernel half")
            l5 = bool(regs["cr4"] & X86_CR4_LA57)
            vl5 = self.vmcoreinfo().pgtable_l5_enabled
            if vl5 is not None and vl5 != l5:
                raise self._error(f"CR4.LA57={l5} but VMCOREINFO pgtable_l5_enabled={vl5}")
        else:
            base = regs["ttbr1_el1"] & 0x0000_FFFF_FFFF_F000
            allowed = {root, root - 0x2000} if self.profile.kpti else {root}  # tramp_pg_dir
            if base not in allowed:
                raise self._error(f"TTBR1_EL1 {regs['ttbr1_el1']:#x} is not swapper_pg_dir "
                                  f"{root:#x}")
            t1sz = (regs["tcr_el1"] >> 16) & 0x3F
            vt1sz = self.vmcoreinfo().tcr_el1_t1sz
            if vt1sz is not None and vt1sz != t1sz:
                raise self._error(f"TCR_EL1.T1SZ={t1sz} but VMCOREINFO says {vt1sz}")
        return root

    def kernel_format(self) -> Format:
        """The kernel half's format: x86 4/5-level per CR4.LA57; arm64 from TCR_EL1."""
        regs = self.registers()
        if self.profile.arch == "x86_64":
            from ptlab.formats.x86 import X86_64

            return X86_64(5 if regs["cr4"] & X86_CR4_LA57 else 4)
        from ptlab.formats.arm64 import Arm64

        tcr = regs["tcr_el1"]
        granule = {0b10: 4096, 0b01: 16384, 0b11: 65536}.get((tcr >> 30) & 3)
        if granule is None:
            raise self._error(f"TCR_EL1 {tcr:#x}: reserved TG1")
        return Arm64(granule, 64 - ((tcr >> 16) & 0x3F), upper=True)
