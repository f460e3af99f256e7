"""Errors of the engine: an operation that raises one has written nothing."""

from __future__ import annotations


class EngineError(ValueError):
    """An operation the engine refuses (nothing was written)."""


class MappingExists(EngineError):
    """map() would overwrite an existing mapping."""


class NotMapped(EngineError):
    """The operation needs a mapping where there is none."""
