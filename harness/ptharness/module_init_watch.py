"""The init layout of a module being loaded, caught before ``do_free_init`` frees it.

``load_module`` allocates the init layout (.init.text, .init.data and the full symtab) in its
own vm area (6.12: one per init memory type), and ``do_init_module`` queues its vfree
(``do_free_init``, a work item) once the module's init has run: the kernel picks those pages
and frees them before the guest can be stopped by the harness, yet their direct-map aliases
change for good
(``vm_remove_mappings``). A gdbstub breakpoint on ``do_free_init`` stops the guest while
the init layout is still mapped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ptlab.kernel.modules import ModuleLayoutError, mapped_area
from ptlab.walk import Run

from .kernel_compare import PAGE, mapped_pa, walk_runs

if TYPE_CHECKING:
    from .kernel_scenarios import Target


def watch_free_init(t: Target, path: str, area: tuple[int, int],
                    timeout: float = 60.0) -> list[Run]:
    """``ptagent insmod path`` with a gdbstub breakpoint on ``do_free_init`` (QEMU's TCG
    breakpoints write no guest memory): when the init layout's deferred free starts, its
    pages are still mapped; the modules area is walked then, the breakpoint removed and
    the VM resumed. Returns that walk of ``area`` (the modules area)."""
    import threading

    from . import scenarios
    from .gdbstub import GdbClient, GdbError
    from .profiles import RunPaths

    t.resume()
    addr = scenarios.kallsyms(t.g, ("do_free_init",)).get("do_free_init")
    if addr is None:
        raise scenarios.ScenarioError("kallsyms has no do_free_init")
    gdb = GdbClient(RunPaths(t.g.rundir).gdb, timeout=timeout)  # the VM stops on connect
    got: dict[str, Any] = {}

    def wait_for_stop() -> None:
        try:
            got["stop"] = gdb.request(b"c")  # the reply comes when the breakpoint is hit
            got["runs"] = walk_runs(t.fmt, t.g.memory, t.root, *area)
        except (GdbError, OSError, ValueError) as e:
            got["error"] = e
        finally:
            try:
                gdb.request(b"z0,%x,1" % addr)
            except (GdbError, OSError):
                pass
            gdb.close()
            t.resume()  # QMP cont (QEMU's gdb detach refuses a bare "D" in multiprocess mode)

    try:
        if gdb.request(b"Z0,%x,1" % addr) != b"OK":
            raise GdbError("gdbstub refused the breakpoint on do_free_init")
    except BaseException:
        gdb.close()
        t.resume()
        raise
    waiter = threading.Thread(target=wait_for_stop, daemon=True)
    waiter.start()
    try:
        t.g.agent("insmod", path)
    except BaseException:
        gdb.sock.sendall(b"\x03")  # no init will be freed: interrupt the waiting "c"
        raise
    finally:
        waiter.join(timeout)
        t.resume()
    if waiter.is_alive() or "error" in got or not got.get("stop", b"").startswith(b"T"):
        raise scenarios.ScenarioError(f"do_free_init not caught: stop {got.get('stop')!r}, "
                                      f"error {got.get('error')!r}")
    return got["runs"]


def init_layout(sections: dict[str, int], in_core: Callable[[int], bool], runs: list[Run]
                ) -> list[tuple[int, list[int]]]:
    """(VA, page PAs) of each init area, as mapped when ``do_free_init`` began (``runs``):
    the init sections are the ones sysfs lists outside the core (``in_core``); each area is
    the mapped run around its sections, up to the vmalloc guard page (6.1: one init layout;
    6.12: MOD_INIT_TEXT, MOD_INIT_DATA, MOD_INIT_RODATA each in its own area)."""
    def mapped(va: int) -> bool:
        return mapped_pa(runs, va) is not None

    init = sorted(a for a in sections.values() if not in_core(a))
    out: list[tuple[int, list[int]]] = []
    for a in init:
        if any(b <= a < b + len(p) * PAGE for b, p in out):
            continue
        try:
            lo, hi = mapped_area(a, mapped)
        except ModuleLayoutError:
            raise ValueError(f"init section at {a:#x} not mapped at do_free_init") from None
        pas = [pa for va in range(lo, hi, PAGE) if (pa := mapped_pa(runs, va)) is not None]
        out.append((lo, pas))  # (mapped_area ends where a page is not mapped: all are)
    return out
