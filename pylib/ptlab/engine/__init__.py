"""The generic page-table engine: all-or-nothing operations on any root of any format."""

from .core import PageSizes, TableCore, default_allocator
from .errors import EngineError, MappingExists, NotMapped
from .pagetable import PageTable
from .protect import ApplyFn, AttrChange
from .registry import TableRegistry, registry_for

__all__ = [
    "ApplyFn", "AttrChange", "EngineError", "MappingExists", "NotMapped", "PageSizes",
    "PageTable", "TableCore", "TableRegistry", "default_allocator", "registry_for",
]
