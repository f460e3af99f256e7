"""Module unload and load (issue 9 items 6, 7): the modules area predicted page for page.

``rmmod qemu_fw_cfg`` (loaded by /init, no dependents), then ``insmod`` it again: from its
sysfs sections and coresize the model (:mod:`ptlab.kernel.modules`) predicts, on the tables
as they were, the whole modules area afterwards: unload clears the core's PTEs (tables
kept); load maps the core at the PAs the kernel chose, text RO+X, rodata and ro_after_init
RO+NX, data RW+NX, the vmalloc guard page after it unmapped (``vmalloc``: the whole modules
area); the direct-map aliases follow (``set_memory``: the core and the whole direct map):
on x86 read-only for text, rodata and ro_after_init after load (``cpa_process_alias``), on
arm64 read-only for every page of the core (``change_memory_common`` with rodata=full), RW
(x86: and non-global) after unload and after the init layout's free (``vm_remove_mappings``).
QEMU's MMU (gva2gpa; x86 info tlb) is the witness ptlab did not write. On 6.12 the core is one
vm area per memory type (text, data, rodata, ro_after_init), each with its own guard page, and
the arm64 data's aliases stay writable (rodata_full changes only the area set read-only).
"""

from __future__ import annotations

import pytest
from conftest import assert_predicted
from ptharness import kernel_scenarios as ks
from ptharness import module_scenarios as ms
from ptharness import oracle
from ptlab.arch import arch_for

pytestmark = pytest.mark.qemu
MODULE = "qemu_fw_cfg"
PAGE = 4096


def tlb_flags(target: ks.Target, vas: list[int]) -> dict[int, object]:
    """QEMU's ``info tlb`` attributes of the pages at ``vas`` (a direct-map alias whose
    attributes need no split stays inside its 2M leaf: that leaf's)."""
    lines, _ = oracle.info_tlb(target.g.hmp)
    return {va: oracle.tlb_attrs(leaf.flags)
            for va, leaf in oracle.covering(lines, vas).items()}


class ModuleChecks:
    profile: str
    info_tlb = True  # QEMU's info tlb is x86's; on arm64 gva2gpa is the only witness

    def test_rmmod_then_insmod_predicted(self, target: ks.Target):
        path = ms.ko_path(target, MODULE)
        out = ms.rmmod(target, MODULE)
        assert_predicted(out, self.profile)
        assert_predicted(out.extra["set_memory"], self.profile)
        lay = out.extra["layout"]
        core = lay.pages()
        assert oracle.gva2gpa_many(target.g.hmp, core).gpas == [None] * len(core)
        aliases = out.extra["aliases"]
        assert len(aliases) == len(core)
        if self.info_tlb:
            tlb = tlb_flags(target, aliases)  # vm_remove_mappings: RW, not global
            assert [(tlb[a].writable, tlb[a].global_) for a in aliases] == [
                (True, False)] * len(core)

        out = ms.insmod(target, MODULE, path)
        assert_predicted(out, self.profile)
        assert_predicted(out.extra["set_memory"], self.profile)
        lay = out.extra["layout"]
        core = lay.pages()
        gpas = oracle.gva2gpa_many(target.g.hmp, [*core, *lay.guards]).gpas
        assert None not in gpas[:len(core)], "core mapped"
        assert gpas[len(core):] == [None] * len(lay.guards), "guard pages not"
        init_pas = [pa for _, pas in out.extra["init"] for pa in pas]  # caught at do_free_init
        assert init_pas
        if not self.info_tlb:
            return
        lines, _ = oracle.info_tlb(target.g.hmp)
        tlb = {ln.va: oracle.tlb_attrs(ln.flags) for ln in lines if lay.contains(ln.va)}
        assert sorted(tlb) == core
        want = [lay.attrs(v, arch_for(target.fmt.arch).page_kernel) for v in core]
        assert [(tlb[v].writable, tlb[v].exec) for v in core] == [
            (w.writable, w.exec) for w in want]
        aliases = out.extra["aliases"]  # cpa_process_alias: RO where the core is, never X
        tlb = tlb_flags(target, aliases)
        assert [(tlb[a].writable, tlb[a].exec) for a in aliases] == [
            (w.writable, False) for w in want]
        alias = ms.alias_of(target)  # the init layout's aliases, reset when it was freed
        tlb = tlb_flags(target, [alias(pa) for pa in init_pas])
        assert [(tlb[alias(pa)].writable, tlb[alias(pa)].global_) for pa in init_pas] == [
            (True, False)] * len(init_pas)

    @pytest.mark.parametrize("name, errno", [("ptlab_no_such_module", 2), ("a/b", 22),
                                             ("failover", 11)])  # used by net_failover: EWOULDBLOCK
    def test_rmmod_errors(self, target: ks.Target, name: str, errno: int):
        from ptharness.errors import AgentError

        target.resume()
        with pytest.raises(AgentError) as e:
            target.g.agent("rmmod", name)
        assert e.value.errno == errno, e.value


for _name, _profile in {"TestX86_64": "x86_64", "TestX86_64La57": "x86_64-la57",
                        "TestX86_64Pti": "x86_64-pti", "TestArm64": "arm64",
                        "TestArm64Kpti": "arm64-kpti"}.items():
    globals()[_name] = pytest.mark.profile(_profile)(
        type(_name, (ModuleChecks,), {"profile": _profile,
                                      "info_tlb": not _profile.startswith("arm64")}))
