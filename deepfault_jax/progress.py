"""Progress reporting for long work: the core calls a callback, the command line draws bars.

A progress callback is any ``progress(stage, done, total, **info)``: ``stage``
names the work (``"train"``, ``"epoch 3/40"``, ``"spectrum"``, ``"synthesis"``,
``"faultbench"``, ...), ``done`` counts finished units (epochs, batches,
trials), ``total`` is their number (None when unknown), and ``info`` holds
numbers worth a line of their own (after an epoch: ``loss`` and
``test_accuracy``). The core never prints; the command line passes a callback
that draws a progress bar per stage on stderr and prints the ``info`` lines.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "notify"]

#: ``progress(stage, done, total, **info)``; see the module docstring.
Progress = Callable[..., None]


def notify(
    progress: Progress | None, stage: str, done: int, total: int | None, **info: float
) -> None:
    """Calls ``progress(stage, done, total, **info)`` when a callback was given (None: nothing)."""
    if progress is not None:
        progress(stage, done, total, **info)
