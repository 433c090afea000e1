"""A spectrum as an ``nnx.Metric``, for training and evaluation loops."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from deepfault_jax.probe import NeuronIndex
from deepfault_jax.spectrum import Spectrum, init_spectrum, update_spectrum

__all__ = [
    "SpectrumMetric",
]


class SpectrumMetric(nnx.Metric):
    """An ``nnx.Metric`` that accumulates a spectrum: ``update`` / ``compute`` / ``reset``.

    Carry it in an NNX eval step with one extra line::

        metric = SpectrumMetric(probe.index, num_classes=10)
        logits, acts = probe(params, x)
        metric.update(logits=logits, activations=acts, labels=y)
        spectrum = metric.compute()

    Linen users call the pure :func:`init_spectrum` and :func:`update_spectrum` instead.
    """

    def __init__(self, index: NeuronIndex, *, num_classes: int, threshold: float = 0.0):
        self.index = index
        self.threshold = float(threshold)
        zero = init_spectrum(index, num_classes=num_classes, threshold=threshold)
        self.a_pass = nnx.metrics.MetricState(zero.a_pass)
        self.a_fail = nnx.metrics.MetricState(zero.a_fail)
        self.n_pass = nnx.metrics.MetricState(zero.n_pass)
        self.n_fail = nnx.metrics.MetricState(zero.n_fail)

    def reset(self) -> None:
        """Sets every count to zero."""
        for var in (self.a_pass, self.a_fail, self.n_pass, self.n_fail):
            var[...] = jnp.zeros_like(var[...])

    def update(self, *, logits, activations, labels, mask=None, **_) -> None:  # noqa: D417
        """Adds a batch: ``logits[batch, classes]``, ``activations`` (flat or per layer), ``labels[batch]``."""
        new = update_spectrum(self.compute(), logits, activations, labels, mask=mask)
        self.a_pass[...], self.a_fail[...] = new.a_pass, new.a_fail
        self.n_pass[...], self.n_fail[...] = new.n_pass, new.n_fail

    def compute(self) -> Spectrum:
        """The spectrum so far."""
        return Spectrum(
            self.a_pass[...],
            self.a_fail[...],
            self.n_pass[...],
            self.n_fail[...],
            self.index,
            self.threshold,
        )
