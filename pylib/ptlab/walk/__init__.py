"""The one walker: translate a VA with a full trace (:mod:`.trace`), iterate leaf runs over a
VA range (:mod:`.walker`) into :class:`Run` values and :class:`RunTable` sequences
(:mod:`.runs`). Works on any :class:`~ptlab.memory.PhysMemory` and any
:class:`~ptlab.formats.Format`."""

from .runs import HOLE_ATTRS, Anomaly, Run, RunBlock, RunTable
from .trace import Step, Trace, level_name, translate
from .walker import DEFAULT_MAX_TABLES, Walker, walk_runs

__all__ = [
    "DEFAULT_MAX_TABLES", "HOLE_ATTRS", "Anomaly", "Run", "RunBlock", "RunTable", "Step", "Trace",
    "Walker", "level_name", "translate", "walk_runs",
]
