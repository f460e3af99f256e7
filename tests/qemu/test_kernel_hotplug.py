"""Memory hotplug: the model's direct map and vmemmap == the real kernel's, at every step.

x86 (pc-dimm at 4G): a 256M DIMM after ``device_add`` (``arch_add_memory``: 2M direct map +
2M vmemmap blocks, before any onlining), after ``online_movable`` of each block (the tables
must not change: the model's "after add" must still equal the real tables), after offline +
``device_del`` (``arch_remove_memory``: everything unmapped, emptied tables freed — as many
as the real kernel freed). Then a 384M DIMM at the same address, its three blocks onlined
with ``online``, ``online_kernel``, ``online_movable``; it is not removed (its kernel-zone
blocks get unmovable kernel allocations: offline fails with EBUSY, the kernel's choice).
arm64 (virtio-mem, memhp_default_state=online_movable): plug 256M, unplug.
The real kernel's page allocator picks the vmemmap blocks' frames (the model takes those as
input); everything else is predicted.
"""

from __future__ import annotations

import sys

import pytest
from ptharness import hotplug_scenarios as hs
from ptharness import kernel_scenarios as ks

pytestmark = pytest.mark.qemu
M2 = 1 << 21




def show(steps: list[hs.Step]) -> None:
    for s in steps:
        print(f"{s.name}: {s.comparison.summary()}  tables: model {s.cost}, real (added, "
              f"freed) {s.real_tables}; QEMU disagrees at {len(s.qemu)}", file=sys.stderr)


def check(steps: list[hs.Step]) -> None:
    show(steps)
    for s in steps:
        assert s.comparison.equal, s.comparison.summary()
        assert s.comparison.agree > 0
        assert not s.qemu, s.qemu  # QEMU's MMU translates the range as the model does
    add, remove = steps[0], steps[-1]
    assert add.cost is not None and remove.cost is not None
    assert add.cost.tables_allocated == add.real_tables[0]
    assert remove.cost.tables_freed == remove.real_tables[1]
    assert add.real_tables[1] == 0 and remove.real_tables[0] == 0


class PcDimmChecks:
    profile: str
    hotplug = True  # the class's guest gets hotplug slots (tests/qemu/conftest.py target)

    def test_pc_dimm_add_online_offline_remove(self, target: ks.Target) -> None:
        removed = hs.x86_pc_dimm(target, 256, ("online_movable",) * 2, remove=True)
        check(removed)
        for step, sign in ((removed[0], 1), (removed[-1], -1)):  # the kernel's own count
            old, new = step.extra["meminfo"]
            assert new[M2] - old[M2] == sign * (256 << 20), step.extra["meminfo"]
        assert removed[-1].real_tables[1] >= 1  # the DIMM's own direct-map PMD table
        modes = hs.x86_pc_dimm(target)  # at the same address again
        show(modes)
        assert modes[0].extra["start"] == removed[0].extra["start"]
        assert [s.name.split()[1] for s in modes[1:]] == list(hs.ONLINE_MODES)
        # the kernel's own word on where each block went (default zone: Normal)
        assert [s.extra["zone"] for s in modes[1:]] == ["Normal", "Normal", "Movable"]
        assert modes[0].cost is not None
        assert modes[0].cost.tables_allocated == modes[0].real_tables[0] >= 1
        for s in removed[1:-1] + modes:  # onlining touches no kernel table
            assert s.comparison.equal and not s.qemu, s.comparison.summary()
            assert s is modes[0] or s.real_tables == (0, 0), s.name


class VirtioMemChecks:
    profile: str
    hotplug = True

    def test_virtio_mem_plug_unplug(self, target: ks.Target) -> None:
        steps = hs.arm64_virtio_mem(target)
        check(steps)
        assert steps[-1].real_tables[1] >= 1


CLASSES: dict[str, tuple[str, type]] = {
    "TestX86_64": ("x86_64", PcDimmChecks),
    "TestX86_64La57": ("x86_64-la57", PcDimmChecks),
    "TestX86_64Pti": ("x86_64-pti", PcDimmChecks),
    "TestArm64": ("arm64", VirtioMemChecks),
    "TestArm64Kpti": ("arm64-kpti", VirtioMemChecks),
}
for _name, (_profile, _base) in CLASSES.items():
    globals()[_name] = pytest.mark.profile(_profile)(type(_name, (_base,), {"profile": _profile}))
