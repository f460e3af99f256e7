"""The CLI's error: bad input, reported as one line with exit status 2."""

from __future__ import annotations


class CliError(Exception):
    """Bad input: reported as one ``ptlab: error:`` line, exit status 2."""
