"""Reference implementations written from the paper's definitions, in plain NumPy loops.

Slow on purpose: one input and one neuron at a time, as DeepFault defines the
hit spectrum. The fast paths must match these exactly.
"""

from __future__ import annotations

import numpy as np


def spectrum_loops(logits, activations, labels, *, num_classes, threshold=0.0):
    """Per class c and neuron n: a_pass, a_fail (active, i.e. value > threshold, on
    correctly / wrongly classified inputs of class c), n_pass, n_fail."""
    logits, activations, labels = np.asarray(logits), np.asarray(activations), np.asarray(labels)
    n_inputs, n_neurons = activations.shape
    a_pass = np.zeros((num_classes, n_neurons), np.int64)
    a_fail = np.zeros((num_classes, n_neurons), np.int64)
    n_pass = np.zeros(num_classes, np.int64)
    n_fail = np.zeros(num_classes, np.int64)
    for i in range(n_inputs):
        c = int(labels[i])
        predicted = int(np.argmax(logits[i]))
        correct = predicted == c
        if correct:
            n_pass[c] += 1
        else:
            n_fail[c] += 1
        for j in range(n_neurons):
            if activations[i, j] > threshold:
                if correct:
                    a_pass[c, j] += 1
                else:
                    a_fail[c, j] += 1
    return a_pass, a_fail, n_pass, n_fail


def dense_forward(x, kernel, bias):
    """One Dense layer, input by input and unit by unit."""
    x, kernel, bias = (np.asarray(a, np.float64) for a in (x, kernel, bias))
    out = np.zeros((x.shape[0], kernel.shape[1]))
    for i in range(x.shape[0]):
        for u in range(kernel.shape[1]):
            out[i, u] = bias[u] + sum(x[i, k] * kernel[k, u] for k in range(kernel.shape[0]))
    return out


def conv_same_forward(x, kernel, bias):
    """A stride-1 SAME convolution ``[n, h, w, cin] -> [n, h, w, cout]``, position by position."""
    x, kernel, bias = (np.asarray(a, np.float64) for a in (x, kernel, bias))
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    padded = np.zeros((n, h + kh - 1, w + kw - 1, cin))
    padded[:, top : top + h, left : left + w] = x
    out = np.zeros((n, h, w, cout))
    for i in range(h):
        for j in range(w):
            patch = padded[:, i : i + kh, j : j + kw, :]
            out[:, i, j, :] = np.tensordot(patch, kernel, axes=([1, 2, 3], [0, 1, 2])) + bias
    return out


def reduce_conv(value, how):
    """The paper's conv neuron: the channel's spatial mean (or max; or every position)."""
    value = np.asarray(value)
    if value.ndim == 2:
        return value
    if how == "none":
        return value.reshape(value.shape[0], -1)
    axes = tuple(range(1, value.ndim - 1))
    return value.mean(axis=axes) if how == "mean" else value.max(axis=axes)
