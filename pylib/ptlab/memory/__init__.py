"""Physical-memory backends behind one interface (:class:`PhysMemory`)."""

from .base import MemoryError_, OutOfRange, PhysMemory
from .elfcore import CpuState, ElfCore, ElfCoreError, Load, Note, WrongArch
from .kdump import KdumpCompressed, KdumpError, NotInDump
from .raw import FileMemory, ImageError, RawImage, Segment
from .sparse import SparseMemory
from .vmcoreinfo import VmcoreInfo, VmcoreInfoError

__all__ = [
    "CpuState", "ElfCore", "ElfCoreError", "FileMemory", "ImageError", "KdumpCompressed",
    "KdumpError", "Load", "MemoryError_", "NotInDump", "Note", "OutOfRange", "PhysMemory",
    "RawImage", "Segment", "SparseMemory", "VmcoreInfo", "VmcoreInfoError", "WrongArch",
]
