"""The package's input-error types and the small validators every module shares.

One contract: a problem with what the caller gave (an option, a file, a data
set, a model) raises :class:`InputError` (a ``ValueError``) or
:class:`InputTypeError` (also a ``TypeError``), with a message that names the
expected and the actual value. The command line turns exactly these into one
line on stderr and exit code 2. Any other exception is a bug of the package and
shows its traceback (exit code 1).
"""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = [
    "InputError",
    "InputTypeError",
    "check_finite",
    "check_int",
    "check_key",
    "check_seed",
    "describe_os_error",
    "env_path",
    "parse_int_list",
    "parse_names",
]

MAX_SEED = 2**63 - 1


class InputError(ValueError):
    """Bad input from the caller: the message names the expected and the actual value."""


class InputTypeError(InputError, TypeError):
    """Input of the wrong type (still an :class:`InputError`, and a ``TypeError``)."""


def check_finite(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Returns ``value`` as a finite float in the given range, or raises :class:`InputError`.

    Args:
      name: how the caller knows the value (an option or argument name).
      value: a real number (bool is refused).
      lo, hi: optional bounds; ``lo_open``/``hi_open`` make them strict.

    Example: ``check_finite("d", 0.1, lo=0.0, lo_open=True)`` returns ``0.1``;
    ``check_finite("d", float("inf"))`` raises "d must be a finite number; got inf".
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        and not hasattr(value, "__float__")
    ):
        raise InputTypeError(f"{name} must be a number; got {type(value).__name__} {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise InputError(f"{name} must be a finite number; got {v}")
    below = lo is not None and (v <= lo if lo_open else v < lo)
    above = hi is not None and (v >= hi if hi_open else v > hi)
    if below or above:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else f"{lo:g}"
        hi_s = "inf" if hi is None else f"{hi:g}"
        raise InputError(f"{name} must lie in {left}{lo_s}, {hi_s}{right}; got {v:g}")
    return v


def check_int(name: str, value: Any, *, lo: int | None = None, hi: int | None = None) -> int:
    """Returns ``value`` as an int in ``[lo, hi]``, or raises :class:`InputError`.

    Floats are accepted only when integral (``3.0``); ``3.9`` and ``True`` are refused.
    """
    if isinstance(value, bool):
        raise InputTypeError(f"{name} must be an integer; got bool {value!r}")
    if isinstance(value, int):
        v = value
    elif hasattr(value, "__index__"):  # numpy integers
        v = int(value.__index__())
    elif isinstance(value, float) or hasattr(value, "is_integer"):
        f = float(value)
        if not math.isfinite(f) or not f.is_integer():
            raise InputError(f"{name} must be an integer; got {value!r}")
        v = int(f)
    else:
        raise InputTypeError(f"{name} must be an integer; got {type(value).__name__} {value!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        lo_s = "-inf" if lo is None else str(lo)
        hi_s = "inf" if hi is None else str(hi)
        raise InputError(f"{name} must lie in [{lo_s}, {hi_s}]; got {v}")
    return v


def check_seed(value: Any, *, name: str = "seed") -> int:
    """A PRNG seed: an integer in ``[0, 2**63 - 1]`` (what ``jax.random.key`` and numpy take)."""
    return check_int(name, value, lo=0, hi=MAX_SEED)


def describe_os_error(e: OSError) -> str:
    """``e`` as a short phrase: its strerror (``"No such file or directory"``) or its text."""
    return e.strerror or str(e) or type(e).__name__


def env_path(name: str) -> str | None:
    """An environment variable naming a path: ``None`` when unset or empty (empty = default)."""
    value = os.environ.get(name, "")
    return value or None


def parse_int_list(text: str, what: str) -> tuple[int, ...]:
    """``"1,5,10"`` -> ``(1, 5, 10)``, with a clear error."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers; got {text!r}") from None
    if not values:
        raise InputError(f"{what} must list at least one integer; got {text!r}")
    return values


def parse_names(text: str, what: str) -> tuple[str, ...]:
    """``"a,b"`` -> ``("a", "b")``."""
    values = tuple(t.strip() for t in text.split(",") if t.strip())
    if not values:
        raise InputError(f"{what} must list at least one name; got {text!r}")
    return values


def check_key(key: Any) -> None:
    """Refuses anything but a JAX PRNG key: a typed key (``jax.random.key``) or a raw
    ``uint32`` one (``jax.random.PRNGKey``)."""
    import jax
    import numpy as np

    dtype = getattr(key, "dtype", None)
    if isinstance(key, (jax.Array, np.ndarray)) and (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == np.uint32
    ):
        return
    raise InputTypeError(
        f"key must be a JAX PRNG key such as jax.random.key(0); got {type(key).__name__} {key!r}"
    )
