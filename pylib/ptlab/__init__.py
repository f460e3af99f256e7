"""ptlab: an executable model of a shared kernel page-table library.

Vocabulary (every module uses these words in these senses; after the one at the top of
Linux's drivers/iommu/generic_pt/pt_defs.h):

VA
    A virtual address as the CPU sees it: canonical, 64 bits (x86 sign-extended; arm64
    TTBR1 addresses have their top bits set). Internally the cursor and the engine use the
    *low VA*, ``va & (2**va_bits - 1)``, so one root spans [0, 2**va_bits).
OA / PA
    Output address: what an entry points to — the PA (physical address) of the next table
    for a table entry, of the mapped page for a leaf. Guests' PAs are guest-physical.
level
    Numbered as in generic_pt: level 0 is the leaf-most table (the kernel's pte), level
    ``levels - 1`` the root (pgd). Kernel names per level (pte, pmd, pud, p4d, pgd) come
    from the architecture module (:mod:`ptlab.arch`).
entry, table, leaf
    An *entry* is one u64 slot of a table. A *table* is one page of entries at one level.
    An entry is EMPTY (nothing), a TABLE entry (points to a lower table) or a LEAF (a
    translation: a page at level 0, a huge page / block above). A non-present leaf (x86's
    L1TF-inverted secretmem pte) is still a leaf entry, but not a translation.
root
    The PA of a top-level table; what CR3 / TTBR holds. A format plus a root is a page table.
run
    A VA range of leaves with one page size and equal effective attributes whose OAs are
    contiguous: what ptdump prints as one line. A *hole* is a run of empty entries (or of
    entries a walk could not follow), reported only when asked for.
own vs effective attributes
    A leaf's *own* attributes are its bits; its *effective* attributes are those after the
    restrictions of the table entries above it (x86 RW/US/NX, arm64 APTable/PXNTable/
    UXNTable) are ANDed in (:func:`ptlab.formats.base.combine`).
start / end / last
    Ranges are [start, end): ``end`` is exclusive. ``last`` (generic_pt's ``last_va``) is
    the inclusive last address, ``end - 1``; used where ``end`` would overflow 2**64.
share
    Two roots pointing at the same lower table, so a change below it is seen through both
    (x86 KPTI's user PGD, ASI's nonsensitive root). A shared table is freed when its last
    reference goes.
gather
    The mmu_gather analogue (:mod:`ptlab.tlb`): collects TLB-flush ranges and table frees
    of operations, so a batch costs one flush; counts flushes.
owner
    Who a table page is charged to by the accounting allocator (a task, a VM, "kernel").
nonsensitive
    ASI's restricted kernel address space: a second kernel root mapping only what may be
    exposed to speculation, sharing the kernel's sub-tables where the policy allows.
cursor
    One position in a descent (:mod:`ptlab.walk.cursor`, after generic_pt's
    ``struct pt_state``): the only code that walks from a root to lower tables.
"""

__version__ = "0.1.0"
