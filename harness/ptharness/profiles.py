"""Guest profiles (which QEMU, machine, CPU and kernel command line) and the QEMU command line.

A profile names one way of booting a real kernel: x86-64 with 4- or 5-level paging or PTI,
arm64 with or without KPTI. :func:`qemu_command` turns a profile plus the run's paths into
the argv of a TCG QEMU whose RAM is a shared file the harness maps (zero copy).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# cryptomgr.notests: the crypto self-tests cost ~0.37 s of an arm64 TCG boot
# (crypto_algapi_init with initcall_debug) and touch no page table the tests look at.
COMMON_CMDLINE = ("quiet", "panic=-1", "secretmem.enable=1", "cryptomgr.notests")


@dataclass(frozen=True)
class Board:
    """What QEMU's machine for one architecture looks like to the harness (not kernel facts:
    those are ptlab.arch's)."""

    ram_base: int  # PA of the first byte of boot RAM (hw/arm/virt.c VIRT_MEM: 1 GiB)
    hotplug: str  # memory hotplug device: "pc-dimm" (slots) or "virtio-mem" (one device)
    maxmem_mb: int  # -m maxmem= with hotplug
    slots: int  # -m slots= with hotplug (0: none)
    hotplug_cmdline: tuple[str, ...]  # kernel parameters a hotplug guest needs
    registers: str  # where control registers come from: "hmp" (info registers) or "gdbstub"
    gdb_registers: tuple[str, ...]  # gdbstub system registers read (QEMU's XML names)
    debug_walk_checks_el: bool  # gva2gpa / x use the current EL's permissions (arm64)
    boot_cmdline: tuple[str, ...] = ()  # kernel parameters every guest of this machine gets


# Hotplug geometry: x86 pc-dimm slots; arm64 one virtio-mem device of this many MiB.
X86_SLOTS, X86_MAXMEM_MB = 4, 8192
ARM64_MAXMEM_MB, VIRTIO_MEM_MB = 4096, 2048
VIRTIO_MEM_ID, VIRTIO_MEM_BACKEND = "vm0", "vmem0"

# x86: hotplugged DIMMs stay offline until a test onlines them. Debian's 6.1 does that by
# default; 6.12 is built with MHP_DEFAULT_ONLINE_TYPE_ONLINE_AUTO (add_memory_resource,
# mm/memory_hotplug.c, onlines every added block at once, in a zone the kernel then allocates
# from, so the DIMM could never be removed). memhp_default_state= overrides both.
# arm64: -kernel's Image, the initrd and the DTB are ROM blobs in guest RAM, which loadvm's
# machine reset copies back over RAM before virtio_load reads the virtqueue indices there
# (hw/core/loader.c rom_reset). The kernel used to put virtio-net's control queue into the
# freed initrd, so a fast checkpoint (RAM copied by the harness) was impossible and QEMU saved
# all RAM (checkpoint 0.69 s, reset 0.70 s). retain_initrd (init/initramfs.c) keeps the initrd
# pages reserved instead of freeing them: no queue lands there, checkpoint 0.27 s, reset 0.51 s.
# The pages stay in the linear map as before (reserved, not freed to the page allocator).
BOARDS: dict[str, Board] = {
    "x86_64": Board(0, "pc-dimm", X86_MAXMEM_MB, X86_SLOTS, ("memhp_default_state=offline",),
                    "hmp", (), False),
    "arm64": Board(0x4000_0000, "virtio-mem", ARM64_MAXMEM_MB, 0,
                   ("memhp_default_state=online_movable",), "gdbstub",
                   ("TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "cpsr", "pc"), True,
                   ("retain_initrd",)),
}


ENTRIES = ("pvh", "la57", "bzimage")  # Profile.entry: how an x86 kernel is entered


@dataclass(frozen=True)
class Profile:
    """One bootable configuration of a guest."""

    name: str
    arch: str  # "x86_64" | "arm64" (the image's arch)
    qemu: str  # QEMU system binary
    machine: str  # -machine type
    cpu: str  # -cpu model and properties
    console: str  # serial console device of the kernel
    levels: int  # paging levels the default kernel is expected to use
    kpti: bool = False  # kernel page-table isolation forced on
    cmdline: tuple[str, ...] = field(default=())  # profile-specific kernel parameters
    # How an x86 kernel is entered (arm64 boots its Image): "pvh" = the image's vmlinux through
    # its PVH note (no decompressor: 2x faster; no KASLR; never 5-level paging); "la57" = the
    # vmlinux through ptlab's 5-level entry (image_entry.py: no decompressor, memory KASLR);
    # "bzimage" = the packaged bzImage and its decompressor.
    entry: str = "pvh"
    # (kernel series, levels) where a kernel's configuration uses other levels than `levels`
    levels_by_kernel: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if self.entry not in ENTRIES:
            raise ValueError(f"profile {self.name}: entry {self.entry!r} is not one of {ENTRIES}")

    def levels_on(self, kernel: str) -> int:
        """Paging levels the kernel of series ``kernel`` uses on this profile."""
        return dict(self.levels_by_kernel).get(get_kernel(kernel), self.levels)

    @property
    def board(self) -> Board:
        """The QEMU machine facts of this profile's architecture."""
        return BOARDS[self.arch]

    @property
    def ram_base(self) -> int:
        """PA where the machine places the first byte of boot RAM."""
        return self.board.ram_base


# Debian's arm64 6.12 is ARM64_VA_BITS_52: with FEAT_LPA2 (QEMU's "max" CPU has it) the 4K
# kernel runs 52-bit VAs on 5 levels (arm64-4k-52), 6.1 is 48-bit on 4.
ARM64_LEVELS = (("6.12", 5),)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("x86_64", "x86_64", "qemu-system-x86_64", "q35", "max,-la57", "ttyS0", 4),
        Profile("x86_64-la57", "x86_64", "qemu-system-x86_64", "q35", "max", "ttyS0", 5,
                entry="la57"),
        Profile(
            "x86_64-pti", "x86_64", "qemu-system-x86_64", "q35", "max,-la57", "ttyS0", 4,
            kpti=True, cmdline=("pti=on",),
        ),
        Profile("arm64", "arm64", "qemu-system-aarch64", "virt", "max,pauth-impdef=on",
                "ttyAMA0", 4, levels_by_kernel=ARM64_LEVELS),
        Profile(
            "arm64-kpti", "arm64", "qemu-system-aarch64", "virt", "max,pauth-impdef=on",
            "ttyAMA0", 4, kpti=True, cmdline=("kpti=1",), levels_by_kernel=ARM64_LEVELS,
        ),
    )
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ValueError naming the known ones otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown guest profile {name!r}; known: {', '.join(PROFILES)}") from None


# Kernel series a guest image can carry (Debian bookworm's linux-image packages); the first is
# the default. A series is the kernel's "major.minor" (uname -r starts with it).
KERNELS: tuple[str, ...] = ("6.1", "6.12")
DEFAULT_KERNEL = KERNELS[0]
ARCHES: tuple[str, ...] = tuple(BOARDS)


def get_kernel(series: str | None) -> str:
    """``series`` checked against :data:`KERNELS` (None or "" = the default); ValueError
    naming the known ones otherwise."""
    if not series:
        return DEFAULT_KERNEL
    if series not in KERNELS:
        raise ValueError(f"unknown kernel {series!r}; known: {', '.join(KERNELS)}")
    return series


def kernel_series(release: str) -> str:
    """The series of :data:`KERNELS` a kernel release (``uname -r``, e.g. 6.12.117+deb12-arm64)
    belongs to; ValueError otherwise."""
    major_minor = ".".join(release.split("-")[0].split("+")[0].split(".")[:2])
    if major_minor not in KERNELS:
        raise ValueError(f"kernel {release!r} is of no known series ({', '.join(KERNELS)})")
    return major_minor


def select_profiles(arch: str | None = None, names: str | None = None) -> list[Profile]:
    """The profiles a run selects: ``arch`` (x86_64, arm64, all; None = all) and ``names``
    (a comma list of profile names; None or "" = every profile of ``arch``).

    ValueError (one line) for an unknown arch or profile, or a selection that is empty.
    """
    arch = arch or "all"
    if arch not in (*ARCHES, "all"):
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHES)}, all")
    if names:
        wanted = [n.strip() for n in names.split(",")]
        if "" in wanted:
            raise ValueError(f"empty profile name in {names!r}")
        chosen = [get_profile(n) for n in dict.fromkeys(wanted)]
    else:
        chosen = list(PROFILES.values())
    chosen = [p for p in chosen if arch == "all" or p.arch == arch]
    if not chosen:
        raise ValueError(f"profiles {names!r} include none of arch {arch}")
    return chosen


@dataclass(frozen=True)
class RunPaths:
    """Files of one run, all inside the private run directory."""

    rundir: Path

    @property
    def qmp(self) -> Path:
        return self.rundir / "qmp.sock"

    @property
    def gdb(self) -> Path:
        return self.rundir / "gdb.sock"

    @property
    def serial(self) -> Path:
        return self.rundir / "serial.log"

    @property
    def qmp_log(self) -> Path:
        """Transcript of the QMP commands and replies (:class:`ptharness.qmp.Monitor`)."""
        return self.rundir / "qmp.log"

    @property
    def stderr(self) -> Path:
        return self.rundir / "qemu.err"

    @property
    def ram(self) -> Path:
        return self.rundir / "ram0"

    def backend(self, ident: str) -> Path:
        """File of a hotplugged memory backend."""
        return self.rundir / ident


def kernel_cmdline(profile: Profile, key_b64: str, *, hotplug: bool = False) -> str:
    """The guest kernel's command line: console, common knobs, the profile's, the SSH key."""
    args = [f"console={profile.console}", *COMMON_CMDLINE, *profile.board.boot_cmdline,
            *profile.cmdline]
    if hotplug:
        args += profile.board.hotplug_cmdline
    args.append(f"ptlab.key={key_b64}")
    return " ".join(args)


def qemu_command(
    profile: Profile,
    *,
    kernel: Path,
    initrd: Path,
    paths: RunPaths,
    loader: Path | None = None,
    ssh_port: int,
    key_b64: str,
    mem_mb: int = 1024,
    hotplug: bool = False,
    smp: int = 1,
) -> list[str]:
    """argv of a TCG QEMU for ``profile``: shared-file RAM, QMP/gdbstub unix sockets in the
    run directory, serial console to a file, SSH forwarded from 127.0.0.1:``ssh_port``;
    ``loader``: an ELF whose segments QEMU places at their physical addresses (the vmlinux of
    the "la57" entry)."""
    if mem_mb <= 0 or mem_mb % 2:
        raise ValueError(f"mem_mb must be a positive even number of MiB, not {mem_mb}")
    if not 0 < ssh_port < 65536:
        raise ValueError(f"bad SSH port {ssh_port}")
    mem = f"{mem_mb}M"
    board = profile.board
    if hotplug:
        if mem_mb >= board.maxmem_mb:
            raise ValueError(f"mem_mb {mem_mb} leaves no room for hotplug below "
                             f"{board.maxmem_mb} MiB")
        mem += (f",slots={board.slots}" if board.slots else "") + f",maxmem={board.maxmem_mb}M"
    argv = [
        profile.qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", "tcg",
        "-machine", f"{profile.machine},memory-backend=ram0",
        "-cpu", profile.cpu, "-smp", str(smp), "-m", mem,
        "-object",
        f"memory-backend-file,id=ram0,size={mem_mb}M,mem-path={paths.ram},share=on",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append", kernel_cmdline(profile, key_b64, hotplug=hotplug),
        "-chardev", f"file,id=ser0,path={paths.serial}", "-serial", "chardev:ser0",
        "-chardev", f"socket,id=qmp0,path={paths.qmp},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-chardev", f"socket,id=gdb0,path={paths.gdb},server=on,wait=off", "-gdb", "chardev:gdb0",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
        "-device", "virtio-net-pci,netdev=n0,romfile=",
    ]
    if loader is not None:
        argv += ["-device", f"loader,file={loader}"]
    if hotplug and board.hotplug == "virtio-mem":
        argv += [
            "-object",
            f"memory-backend-file,id={VIRTIO_MEM_BACKEND},size={VIRTIO_MEM_MB}M,"
            f"mem-path={paths.backend(VIRTIO_MEM_BACKEND)},share=on",
            "-device",
            f"virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_BACKEND},requested-size=0",
        ]
    return argv
