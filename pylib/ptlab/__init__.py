"""ptlab: an executable model of a shared kernel page-table library."""

__version__ = "0.1.0"
