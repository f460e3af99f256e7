"""Module unload and load (issue 9 items 6, 7): the modules area predicted page for page.

``rmmod qemu_fw_cfg`` (loaded by /init, no dependents), then ``insmod`` it again: from its
sysfs sections and coresize the model (:mod:`ptlab.kernel.modules`) predicts, on the tables
as they were, the whole modules area afterwards: unload clears the core's PTEs (tables
kept); load maps the core at the PAs the kernel chose, text RO+X, rodata and ro_after_init
RO+NX, data RW+NX, the vmalloc guard page after it unmapped. QEMU's MMU (gva2gpa, info tlb)
is the witness ptlab did not write. The direct-map aliases (cpa_process_alias) are outside
this comparison.
"""

from __future__ import annotations

import pytest
from conftest import assert_predicted
from ptharness import kernel_scenarios as ks
from ptharness import module_scenarios as ms
from ptharness import oracle

pytestmark = pytest.mark.qemu

MODULE = "qemu_fw_cfg"
PAGE = 4096






class ModuleChecks:
    profile: str

    def test_rmmod_then_insmod_predicted(self, target: ks.Target):
        path = ms.ko_path(target, MODULE)
        out = ms.rmmod(target, MODULE)
        assert_predicted(out, self.profile)
        lay = out.extra["layout"]
        core = list(range(lay.base, lay.end, PAGE))
        assert oracle.gva2gpa_many(target.g.hmp, core).gpas == [None] * len(core)

        out = ms.insmod(target, MODULE, path)
        assert_predicted(out, self.profile)
        lay = out.extra["layout"]
        core = list(range(lay.base, lay.end, PAGE))
        gpas = oracle.gva2gpa_many(target.g.hmp, [*core, lay.guard]).gpas
        assert None not in gpas[:-1] and gpas[-1] is None, "core mapped, guard page not"
        lines, _ = oracle.info_tlb(target.g.hmp)
        tlb = {ln.va: oracle.tlb_attrs(ln.flags) for ln in lines if lay.base <= ln.va < lay.end}
        assert sorted(tlb) == core
        assert [(tlb[v].writable, tlb[v].exec) for v in core] == [
            (v >= lay.data, v < lay.ro) for v in core]

    @pytest.mark.parametrize("name, errno", [("ptlab_no_such_module", 2), ("a/b", 22),
                                             ("virtio", 11)])  # virtio: in use (EWOULDBLOCK)
    def test_rmmod_errors(self, target: ks.Target, name: str, errno: int):
        from ptharness.errors import AgentError

        target.resume()
        with pytest.raises(AgentError) as e:
            target.g.agent("rmmod", name)
        assert e.value.errno == errno, e.value


for _name, _profile in {"TestX86_64": "x86_64", "TestX86_64La57": "x86_64-la57",
                        "TestX86_64Pti": "x86_64-pti"}.items():
    globals()[_name] = pytest.mark.profile(_profile)(
        type(_name, (ModuleChecks,), {"profile": _profile}))
