"""Progress bars for long loops: a `tqdm` bar on a terminal, nothing at all in CI and logs.

    for window in progress(windows, desc="perplexity", unit="window"): ...
    with progress(total=steps, desc="train") as bar: ...; bar.update(1); bar.set_postfix(loss=...)

A bar is drawn when stderr is a terminal; when it is not (a CI job, `> log 2>&1`, a Hydra sweep's redirected
output) the loop runs with a disabled bar that writes nothing. `OLLM_PROGRESS=1` forces bars on, `0` off. Bars are
left in place only when asked (`leave=True`), so a run's printed summary is not pushed up by finished bars.

This module imports nothing of the toolkit: any floor may use it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

ENV = "OLLM_PROGRESS"


def enabled(stream: TextIO | None = None) -> bool:
    """Whether a bar would be drawn on `stream` (default stderr): OLLM_PROGRESS=1/0 decides, else a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def progress(iterable: Iterable | None = None, *, total: int | float | None = None, desc: str | None = None,
             unit: str = "it", leave: bool = False, file: TextIO | None = None, **kwargs: Any):
    """A tqdm bar over `iterable` (or a manual one: `total=`, then `update`), disabled off a terminal. Returns the
    tqdm object either way, so `update`, `set_postfix` and `with` work the same when it is quiet."""
    from tqdm import tqdm  # not tqdm.auto: a notebook (stderr not a terminal) gets no bar either way

    stream = sys.stderr if file is None else file
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream,
                disable=not enabled(stream), dynamic_ncols=True, **kwargs)


__all__ = ["ENV", "enabled", "progress"]
