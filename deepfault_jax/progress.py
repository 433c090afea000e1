"""Progress reporting for long work: the core calls a callback, the command line draws bars.

A progress callback is any ``progress(stage, done, total)``: ``stage`` names the
work (``"train"``, ``"spectrum"``, ``"synthesis"``, ``"faultbench"``, ...),
``done`` counts finished units (epochs, batches, trials) and ``total`` is
their number, or None when unknown. The core never prints; the command line
passes a callback that draws a progress bar per stage on stderr.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "notify"]

#: ``progress(stage, done, total)``; see the module docstring.
Progress = Callable[[str, int, "int | None"], None]


def notify(progress: Progress | None, stage: str, done: int, total: int | None) -> None:
    """Calls ``progress(stage, done, total)`` when a callback was given (None: nothing)."""
    if progress is not None:
        progress(stage, done, total)
