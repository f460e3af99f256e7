"""One module per architecture for everything that is not the entry codec.

:func:`arch_for` gives the :class:`ArchOps` of a format, an architecture name or an ELF
``e_machine``; :func:`all_arches` lists them. Modules outside ``ptlab.arch`` (and the entry
codecs in :mod:`ptlab.formats`) ask these objects instead of testing an architecture name.

Format and root inference is one function each, used by the CLI (ELF CPU notes, VMCOREINFO)
and by the testbed (live registers, VMCOREINFO): :meth:`ArchOps.format_from` and
:func:`kernel_root`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from . import arm64, x86_64
from .base import END, ArchError, ArchOps, Marker, WxCount, folded_level_names

if TYPE_CHECKING:
    from ..formats.base import Format

__all__ = [
    "END", "ArchError", "ArchOps", "Marker", "WxCount", "all_arches", "arch_for",
    "arch_for_elf", "arch_for_uname", "folded_level_names", "kernel_root", "vmcoreinfo_arch",
]

_ARCHES: dict[str, ArchOps] = {ops.name: ops for ops in (x86_64.OPS, arm64.OPS)}
_ELF: dict[int, ArchOps] = {m: ops for ops in _ARCHES.values() for m in ops.elf_machines}


def all_arches() -> list[ArchOps]:
    """Every architecture ptlab knows."""
    return list(_ARCHES.values())


def arch_for(what: Format | str) -> ArchOps:
    """The :class:`ArchOps` of a format (its ``arch``) or of an architecture name."""
    name = what if isinstance(what, str) else getattr(what, "arch", None)
    try:
        return _ARCHES[name]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ArchError(f"unknown architecture {name!r} (known: {', '.join(_ARCHES)})") from None


def arch_for_elf(e_machine: int) -> ArchOps | None:
    """The architecture of an ELF ``e_machine``, None when ptlab does not read it."""
    return _ELF.get(e_machine)


def arch_for_uname(machine: str) -> ArchOps | None:
    """The architecture of a ``utsname.machine`` string, None when ptlab does not read it."""
    for ops in _ARCHES.values():
        if machine in ops.uname_machines:
            return ops
    return None


def vmcoreinfo_arch(vmci: Any) -> ArchOps | None:
    """The architecture whose own keys ``vmci`` carries, None when it has none."""
    for ops in _ARCHES.values():
        if ops.describes(vmci):
            return ops
    return None


def kernel_root(ops: ArchOps, vmci: Any = None, regs: Mapping[str, int] | None = None, *,
                mem: Any = None, isolation: bool = False,
                where: str = "registers") -> tuple[int, str]:
    """(PA of the kernel's root table, reason): VMCOREINFO's root symbol through
    ``__pa_symbol`` when ``vmci`` is given (checked against the live root register when
    ``regs`` and ``mem`` are given too), else the root register of ``regs``.
    ``isolation``: PTI/KPTI is on, so the register may hold the user-side table."""
    if vmci is not None:
        root = vmci.kernel_root(ops.name)  # VmcoreInfo: checked to be a table address
        if regs is not None and mem is not None:
            ops.check_root(regs, root, mem, isolation)
        return root, f"VMCOREINFO {ops.root_symbol}"
    if regs is None:
        raise ArchError("no VMCOREINFO and no registers to take the root from")
    return ops.root_from_registers(regs, where)
