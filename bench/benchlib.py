"""What every bench script shares: one ``name: value unit`` line per figure (with its target
judged on stderr) and a main guard that turns errors into one line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

Target = tuple[str, float]  # ("<=" | ">=", limit)


def figure(name: str, value: float, unit: str, targets: Mapping[str, Target] | None = None
           ) -> None:
    """Print one figure line; if ``targets`` names it, say on stderr whether it is met."""
    print(f"{name}: {value:.4g} {unit}".rstrip(), flush=True)
    target = (targets or {}).get(name)
    if target is not None:
        op, limit = target
        ok = value <= limit if op == "<=" else value >= limit
        print(f"# {name} target {op} {limit}: {'met' if ok else 'MISSED'}", file=sys.stderr)


def run(main: Callable[[], int], script: str) -> None:
    """``sys.exit(main())``; Ctrl-C exits 130, any other error is one line on stderr."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:  # one clear line, not a traceback
        print(f"{script}: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
