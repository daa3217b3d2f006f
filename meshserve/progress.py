"""Progress bars (tqdm) that stay readable in logs."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that, when stderr is not a terminal (a log file, a pipe, CI), redraws at most every
    30 s instead of 10 times a second: there each redraw is a new line, and a minute-long load wrote
    hundreds. On a terminal it is tqdm's default. An explicit `mininterval` wins."""
    if not getattr(sys.stderr, "isatty", lambda: False)():
        kwargs.setdefault("mininterval", 30.0)
    return tqdm(iterable, **kwargs)
