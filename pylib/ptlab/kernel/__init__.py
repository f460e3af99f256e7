"""The kernel's page-table users rebuilt on the engine's public operations.

Each module names the kernel functions and files it models (Linux 6.1, the guests' kernel)
and works on any :class:`~ptlab.engine.PageTable` — a model table, or a real guest's
tables seen through a copy-on-write :class:`~ptlab.memory.overlay.OverlayMemory` — so a
harness can apply the same operation to a stopped guest's state and compare the result
with what the real kernel did.
"""
