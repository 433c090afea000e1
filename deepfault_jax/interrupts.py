"""Ctrl-C while JAX works: held back until the computation in flight has finished.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be; in
JAX that may be while XLA compiles in a thread of its own, and an interpreter
that exits under that thread crashes (SIGSEGV after the "interrupted"
message). :func:`deferred_interrupt` takes note of the first Ctrl-C instead;
long loops call :func:`stop_if_interrupted` at safe points.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

import jax

__all__ = ["Interrupt", "deferred_interrupt", "stop_if_interrupted"]


class Interrupt:
    """Whether Ctrl-C (SIGINT) arrived inside :func:`deferred_interrupt`."""

    pending: bool = False


@contextlib.contextmanager
def deferred_interrupt():
    """Holds Ctrl-C back while JAX compiles and runs; yields an :class:`Interrupt`.

    Python raises ``KeyboardInterrupt`` wherever the main thread happens to be,
    and inside JAX that may be while XLA still compiles in a thread of its own:
    the interpreter then exits under that thread, which crashes (SIGSEGV, exit
    139, after the "interrupted" message). Here the first SIGINT only takes
    note; the caller stops at a safe point (``pending``), and at the latest the
    block raises ``KeyboardInterrupt`` as it ends. A second Ctrl-C raises at
    once, as usual. Acts only in the main thread and only over Python's default
    handler: a caller's own SIGINT handler (or ``SIG_IGN``) is left alone.
    """
    state = Interrupt()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield state
        return

    def take_note(signum, frame):
        state.pending = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once

    signal.signal(signal.SIGINT, take_note)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if state.pending:
        raise KeyboardInterrupt


def stop_if_interrupted(interrupt: Interrupt, *arrays: Any) -> None:
    """Raises ``KeyboardInterrupt`` if Ctrl-C was pressed, once ``arrays`` (the newest
    results, on which all earlier work depends) are computed: nothing is left running."""
    if interrupt.pending:
        jax.block_until_ready(arrays)
        raise KeyboardInterrupt
