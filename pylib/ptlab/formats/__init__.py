"""Page-table formats: geometry + entry codec (see :mod:`ptlab.formats.base`)."""

from .base import ATTR_FIELDS, EMPTY, PERM_FIELDS, Attrs, Entry, Format, FormatError, Kind, combine

__all__ = [
    "ATTR_FIELDS", "EMPTY", "PERM_FIELDS", "Attrs", "Entry", "Format", "FormatError", "Kind",
    "combine",
]
