"""How the user invoked a command, for usage lines and "rerun" hints that they can paste."""

from __future__ import annotations

import sys
from pathlib import Path


def invoked_as(entry_point: str) -> str:
    """``nlstm-study`` for the installed command, ``python study/run.py`` when a script was run by its path."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else entry_point
    return f"python {argv0}" if argv0.endswith(".py") else Path(argv0).name
