"""Reference implementations written from the paper's definitions, in plain NumPy loops.

Slow on purpose: one input and one neuron at a time, as DeepFault defines the
hit spectrum. The fast paths must match these exactly.
"""

from __future__ import annotations

import math

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


# --------------------------------------------------------------------------- measures


def _div(num, den, zero=0.0):
    return zero if den == 0 else num / den


def measure_loops(name, a_s, a_f, n_s, n_f, *, star=3.0):
    """Every measure from its formula, one neuron at a time, in float64 (Python floats)."""
    a_s, a_f, n_s, n_f = (np.asarray(c, np.float64).ravel() for c in (a_s, a_f, n_s, n_f))
    out = np.zeros(a_s.shape)
    for i in range(a_s.size):
        ep, ef, np_, nf = float(a_s[i]), float(a_f[i]), float(n_s[i]), float(n_f[i])
        F, P = ef + nf, ep + np_
        if name == "tarantula":
            x, y = _div(ef, F), _div(ep, P)
            v = _div(x, x + y)
        elif name == "ochiai":
            v = _div(ef, math.sqrt(F * (ef + ep)))
        elif name == "dstar":
            v = (math.inf if ef > 0 else 0.0) if ep + nf == 0 else ef**star / (ep + nf)
        elif name == "jaccard":
            v = _div(ef, ef + nf + ep)
        elif name == "ochiai2":
            v = _div(ef * np_, math.sqrt((ef + ep) * (nf + np_) * (ef + np_) * (ep + nf)))
        elif name == "op2":
            v = ef - ep / (P + 1)
        elif name == "barinel":
            v = 0.0 if ep + ef == 0 else 1 - ep / (ep + ef)
        elif name == "kulczynski1":
            v = (math.inf if ef > 0 else 0.0) if nf + ep == 0 else ef / (nf + ep)
        elif name == "kulczynski2":
            v = 0.5 * (_div(ef, ef + nf) + _div(ef, ef + ep))
        elif name == "zoltar":
            v = 0.0 if ef == 0 else ef / (ef + nf + ep + 10000 * nf * ep / ef)
        elif name == "wong1":
            v = ef
        elif name == "wong2":
            v = ef - ep
        elif name == "wong3":
            h = ep if ep <= 2 else (2 + 0.1 * (ep - 2) if ep <= 10 else 2.8 + 0.001 * (ep - 10))
            v = ef - h
        elif name == "russell_rao":
            v = _div(ef, F + P)
        elif name == "sorensen_dice":
            v = _div(2 * ef, 2 * ef + nf + ep)
        elif name == "anderberg":
            v = _div(ef, ef + 2 * (nf + ep))
        elif name == "gp13":
            v = 0.0 if ef == 0 else ef * (1 + 1 / (2 * ep + ef))
        elif name == "ample":
            v = abs(_div(ef, F) - _div(ep, P))
        else:
            raise KeyError(name)
        out[i] = v
    return out


def original_scores(name, a_s, a_f, n_s, n_f, *, star=3):
    """DeepFault's own three measures as its code computes them: numpy float64
    division (0/0 = NaN, x/0 = inf), then NaN -> 0. Returns (scores, defined):
    ``defined`` is False where the original produced NaN (or inf, except DStar's)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        a_s, a_f, n_s, n_f = (np.asarray(c, np.float64) for c in (a_s, a_f, n_s, n_f))
        if name == "tarantula":
            raw = (a_f / (a_f + n_f)) / ((a_f / (a_f + n_f)) + (a_s / (a_s + n_s)))
        elif name == "ochiai":
            raw = a_f / np.sqrt((a_f + n_f) * (a_f + a_s))
        elif name == "dstar":
            raw = a_f**star / (a_s + n_f)
        else:
            raise KeyError(name)
    defined = ~np.isnan(raw) & (np.isfinite(raw) | (name == "dstar"))
    return np.where(np.isnan(raw), 0.0, raw), defined


def mlp_logits(x, layers, gates, activation):
    """A Dense MLP in float64: ``layers`` = [(kernel, bias)] hidden then output; each hidden
    layer's output (pre-activation) multiplied by ``gates[i]`` (``[units]``)."""
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    for (kernel, bias), gate in zip(layers[:-1], gates, strict=True):
        z = (h @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)) * gate
        h = activation(z)
    kernel, bias = layers[-1]
    return h @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)


def mlp_attribution_loops(x, y, layers, activation, *, num_classes, linearised, step=1e-4):
    """The attribution sums of DESIGN section 7 from their definitions, in float64.

    ``J[b, c, u] = d logit_c / d gate_u`` by central finite differences (one
    neuron at a time); ``gxa = sum_c J * (softmax - onehot)`` (``a * d loss / d a``
    of the cross-entropy); a fix / break is decided input by input from
    ``argmax(logits - J[:, :, u])`` (``linearised="all-classes"``) or from the
    margin to the strongest other class r (the first of equals), right when
    ``(z_y - z_r) - (J_y - J_r) > 0`` or it is 0 and y < r (``"margin"``).
    Returns a dict of ``[classes, neurons]``
    arrays: act_pass, act_fail, gxa_pass, gxa_fail, fixes, breaks.
    """
    sizes = [np.asarray(k).shape[1] for k, _ in layers[:-1]]
    ones = [np.ones(s) for s in sizes]
    logits = mlp_logits(x, layers, ones, activation)
    # pre-activation values of every hidden neuron
    h = np.asarray(x, np.float64).reshape(len(x), -1)
    values = []
    for kernel, bias in layers[:-1]:
        z = h @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)
        values.append(z)
        h = activation(z)
    values = np.concatenate(values, axis=1)
    n = sum(sizes)
    out = {k: np.zeros((num_classes, n)) for k in ("act_pass", "act_fail", "gxa_pass", "gxa_fail",
                                                   "fixes", "breaks")}  # fmt: skip
    shifted = logits - logits.max(axis=1, keepdims=True)
    softmax = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    neuron = 0
    for layer, size in enumerate(sizes):
        for unit in range(size):
            up = [g.copy() for g in ones]
            down = [g.copy() for g in ones]
            up[layer][unit] += step
            down[layer][unit] -= step
            jac = (
                mlp_logits(x, layers, up, activation) - mlp_logits(x, layers, down, activation)
            ) / (2 * step)
            for b in range(len(x)):
                label = int(y[b])
                correct = int(np.argmax(logits[b])) == label
                side = "pass" if correct else "fail"
                residual = softmax[b].copy()
                residual[label] -= 1.0
                out[f"act_{side}"][label, neuron] += values[b, neuron]
                out[f"gxa_{side}"][label, neuron] += float(jac[b] @ residual)
                if linearised == "all-classes":
                    right = int(np.argmax(logits[b] - jac[b])) == label
                else:
                    others = [c for c in range(num_classes) if c != label]
                    rival = others[int(np.argmax(logits[b, others]))]
                    moved = (logits[b, label] - logits[b, rival]) - (jac[b, label] - jac[b, rival])
                    right = moved > 0 or (moved == 0 and label < rival)
                if not correct and right:
                    out["fixes"][label, neuron] += 1
                if correct and not right:
                    out["breaks"][label, neuron] += 1
            neuron += 1
    return out
