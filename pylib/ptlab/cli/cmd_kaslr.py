"""``ptlab kaslr``: the kernel's base and KASLR displacement from the tables."""

from __future__ import annotations

import argparse
from typing import IO

from ..arch import arch_for
from .errors import CliError
from .infer import infer_format, infer_root
from .inputs import Source
from .walking import walk_budget


def cmd_kaslr(src: Source, args: argparse.Namespace, out: IO[str]) -> int:
    """:func:`ptlab.kaslr.find_kernel_base`; status 1 when VMCOREINFO disagrees."""
    import json

    from ..kaslr import find_kernel_base

    fmt = infer_format(src, args)
    root = infer_root(src, args, fmt)
    base = find_kernel_base(fmt, src.mem, root, **walk_budget(src.mem))
    if base is None:
        lo, hi = arch_for(fmt).image_range(fmt)
        raise CliError(f"no kernel-executable mapping in the image range {lo:#x}-{hi:#x} of "
                       f"root {root:#x}")
    vmci = src.vmcoreinfo
    known = vmci.kernel_offset if vmci is not None else None
    agree = known is None or known == base.offset
    if args.json:
        out.write(json.dumps({"text": f"{base.va:#x}", "phys": f"{base.pa:#x}",
                              "offset": f"{base.offset:#x}",
                              "exec": [f"{base.text[0]:#x}", f"{base.text[1]:#x}"],
                              "vmcoreinfo_offset": None if known is None else f"{known:#x}",
                              "agree": agree}) + "\n")
    else:
        out.write(f"_text {base.va:#x} at PA {base.pa:#x} (executable "
                  f"{base.text[0]:#x}-{base.text[1]:#x})\n"
                  f"KASLR offset {base.offset:#x} (_text linked at "
                  f"{arch_for(fmt).image_base(fmt):#x})\n")
        if known is not None:
            out.write(f"VMCOREINFO KERNELOFFSET={known:x}: "
                      f"{'agrees' if agree else 'DISAGREES'}\n")
    return 0 if agree else 1
