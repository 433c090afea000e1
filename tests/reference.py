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


# --------------------------------------------------------------------------- localizers


def relu64(z):
    return np.maximum(z, 0.0)


def leaky_relu64(z, slope=0.01):
    return np.where(z >= 0, z, slope * z)


#: float64 activations of the zoo models and their derivatives (``jax.nn.relu`` has slope 0
#: at 0, ``jax.nn.leaky_relu`` slope 1 at 0).
ACTIVATIONS64 = {
    "relu": (relu64, lambda z: (z > 0).astype(np.float64)),
    "leaky_relu": (leaky_relu64, lambda z: np.where(z >= 0, 1.0, 0.01)),
}


def cross_entropy64(logits, labels):
    """Per-input cross-entropy ``logsumexp(z) - z_y`` in float64."""
    z = np.asarray(logits, np.float64)
    top = z.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return lse - z[np.arange(len(z)), np.asarray(labels)]


def mlp_backprop(x, y, layers, activation):
    """Per-input cross-entropy gradients of a Dense MLP, by hand, input by input, in float64.

    ``layers`` = [(kernel, bias)] hidden then output; ``activation`` a key of
    :data:`ACTIVATIONS64`. Returns ``(loss [n], grads, pre, dpre)``: ``grads[j] =
    (dkernel [n, fan_in, units], dbias [n, units])`` per layer (output layer last),
    ``pre[j]`` the hidden layer's pre-activation values ``[n, units]`` and ``dpre[j]`` the
    gradient of the input's loss with respect to them.
    """
    act, dact = ACTIVATIONS64[activation]
    layers = [(np.asarray(k, np.float64), np.asarray(b, np.float64)) for k, b in layers]
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n = len(x)
    loss = np.zeros(n)
    grads = [(np.zeros((n, *k.shape)), np.zeros((n, *b.shape))) for k, b in layers]
    pre = [np.zeros((n, k.shape[1])) for k, _ in layers[:-1]]
    dpre = [np.zeros((n, k.shape[1])) for k, _ in layers[:-1]]
    for i in range(n):
        inputs, zs = [x[i]], []
        for kernel, bias in layers[:-1]:
            z = inputs[-1] @ kernel + bias
            zs.append(z)
            inputs.append(act(z))
        logits = inputs[-1] @ layers[-1][0] + layers[-1][1]
        shifted = np.exp(logits - logits.max())
        softmax = shifted / shifted.sum()
        loss[i] = math.log(shifted.sum()) + logits.max() - logits[int(y[i])]
        delta = softmax.copy()  # d loss / d logits
        delta[int(y[i])] -= 1.0
        for j in range(len(layers) - 1, -1, -1):
            grads[j][0][i] = np.outer(inputs[j], delta)
            grads[j][1][i] = delta
            if j == 0:
                break
            d_input = layers[j][0] @ delta  # d loss / d (layer j's input) = hidden j-1's output
            delta = d_input * dact(zs[j - 1])
            pre[j - 1][i] = zs[j - 1]
            dpre[j - 1][i] = delta
    return loss, grads, pre, dpre


def mlp_neuron_gradients(grads, layer, unit):
    """``[n, P]``: per input, the gradient of the neuron's own parameters from
    :func:`mlp_backprop`'s ``grads``: incoming column, bias, outgoing row."""
    (dk, db), (dk_next, _) = grads[layer], grads[layer + 1]
    return np.concatenate([dk[:, :, unit], db[:, unit : unit + 1], dk_next[:, unit, :]], axis=1)


def grad_norm_snr_loops(grads, sizes):
    """``(grad_norm, grad_snr)`` per neuron from per-input gradients, from their definitions:
    ``|| mean_i g_i ||`` and the mean over the neuron's parameters of
    ``(sum_i g_ip)^2 / (n sum_i g_ip^2)`` (0 where the denominator is 0)."""
    norms, snrs = [], []
    for layer, size in enumerate(sizes):
        for unit in range(size):
            g = mlp_neuron_gradients(grads, layer, unit)
            n, p = g.shape
            norms.append(math.sqrt(sum((g[:, q].sum() / n) ** 2 for q in range(p))))
            ratios = []
            for q in range(p):
                first, second = g[:, q].sum(), (g[:, q] ** 2).sum()
                ratios.append(0.0 if second == 0 else first**2 / (n * second))
            snrs.append(sum(ratios) / p)
    return np.array(norms), np.array(snrs)


def gain_ablation_loops(x, y, layers, activation, gains):
    """Per gain, neuron and input: the cross-entropy with the neuron's pre-activation times
    the gain, and whether the input is then classified right, in float64. Returns
    ``(base_loss [n], base_right [n], loss [gains, neurons, n], right [gains, neurons, n])``."""
    act = ACTIVATIONS64[activation][0]
    sizes = [np.asarray(k).shape[1] for k, _ in layers[:-1]]
    ones = [np.ones(s) for s in sizes]
    base = mlp_logits(x, layers, ones, act)
    base_loss = cross_entropy64(base, y)
    base_right = np.argmax(base, axis=1) == np.asarray(y)
    total = sum(sizes)
    loss = np.zeros((len(gains), total, len(x)))
    right = np.zeros((len(gains), total, len(x)), bool)
    for g, gain in enumerate(gains):
        neuron = 0
        for layer, size in enumerate(sizes):
            for unit in range(size):
                gates = [o.copy() for o in ones]
                gates[layer][unit] = gain
                logits = mlp_logits(x, layers, gates, act)
                loss[g, neuron] = cross_entropy64(logits, y)
                right[g, neuron] = np.argmax(logits, axis=1) == np.asarray(y)
                neuron += 1
    return base_loss, base_right, loss, right


def adam_refit_loops(x, y, layers, activation, layer, unit, *, steps, learning_rate,
                     b1=0.9, b2=0.999, eps=1e-8):  # fmt: skip
    """The held-out loss drop of refitting one hidden neuron's own parameters with Adam.

    Written from the definitions: the neuron's pieces (incoming column, bias,
    outgoing row) are ``theta = start + delta * scale`` with ``scale`` the
    piece's RMS plus 1e-6; ``steps`` Adam steps from ``delta = 0`` (``m = b1 m +
    (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``delta -= lr * m_hat / (sqrt(v_hat) +
    eps)`` with the bias corrections ``1 - b^t``) on the mean cross-entropy of the
    even-positioned inputs; the score is the mean cross-entropy of the odd-positioned
    inputs before minus after. In float64.
    """
    x_fit, y_fit, x_out, y_out = x[0::2], y[0::2], x[1::2], y[1::2]
    layers = [(np.array(k, np.float64), np.array(b, np.float64)) for k, b in layers]
    start = [
        layers[layer][0][:, unit].copy(),
        np.array([layers[layer][1][unit]]),
        layers[layer + 1][0][unit, :].copy(),
    ]
    scale = [math.sqrt(float(np.mean(s * s))) + 1e-6 for s in start]

    def with_delta(delta):
        out = [(k.copy(), b.copy()) for k, b in layers]
        theta = [s + d * c for s, d, c in zip(start, delta, scale, strict=True)]
        out[layer][0][:, unit] = theta[0]
        out[layer][1][unit] = theta[1][0]
        out[layer + 1][0][unit, :] = theta[2]
        return out

    def mean_loss(delta, xs, ys):
        act = ACTIVATIONS64[activation][0]
        model = with_delta(delta)
        ones = [np.ones(k.shape[1]) for k, _ in model[:-1]]
        return float(cross_entropy64(mlp_logits(xs, model, ones, act), ys).mean())

    delta = [np.zeros_like(s) for s in start]
    m = [np.zeros_like(s) for s in start]
    v = [np.zeros_like(s) for s in start]
    for t in range(1, steps + 1):
        _, grads, _, _ = mlp_backprop(x_fit, y_fit, with_delta(delta), activation)
        g = mlp_neuron_gradients(grads, layer, unit).mean(axis=0)  # d mean loss / d theta
        sizes = [len(s) for s in start]
        pieces = np.split(g, np.cumsum(sizes)[:-1])
        for q in range(3):
            grad = pieces[q] * scale[q]  # chain rule: d theta / d delta = scale
            m[q] = b1 * m[q] + (1 - b1) * grad
            v[q] = b2 * v[q] + (1 - b2) * grad**2
            m_hat = m[q] / (1 - b1**t)
            v_hat = v[q] / (1 - b2**t)
            delta[q] = delta[q] - learning_rate * m_hat / (np.sqrt(v_hat) + eps)
    zero = [np.zeros_like(s) for s in start]
    return mean_loss(zero, x_out, y_out) - mean_loss(delta, x_out, y_out)


def middle_ranks_loops(score):
    """1-based ranks, higher first; a tie of ``e`` scores after ``g`` greater ones shares
    ``g + (e + 1) / 2``, neuron by neuron."""
    s = [float(v) for v in np.asarray(score).ravel()]
    out = np.zeros(len(s))
    for i, v in enumerate(s):
        greater = sum(1 for w in s if w > v)
        equal = sum(1 for w in s if w == v)
        out[i] = greater + (equal + 1) / 2.0
    return out


def confusion_loops(predicted, values, gxa, y, *, num_classes, measure, threshold=0.0,
                    min_failures=3):  # fmt: skip
    """Minus each neuron's best rank over the confusion pairs, pair by pair.

    For every pair (t, p), t != p, with at least ``min_failures`` inputs of class t
    predicted p: ``measure`` ``"gradxact"`` scores each neuron by the mean of its
    ``gxa`` over those inputs; a count measure (:func:`measure_loops`) by its counts
    over them (failing) and the inputs of class t predicted t (passing), active
    meaning ``value > threshold``. Pairs whose scores are all equal are left out.
    """
    y, predicted = np.asarray(y), np.asarray(predicted)
    n, neurons = np.asarray(values).shape
    best = None
    for t in range(num_classes):
        for p in range(num_classes):
            if t == p:
                continue
            fail = [i for i in range(n) if y[i] == t and predicted[i] == p]
            passing = [i for i in range(n) if y[i] == t and predicted[i] == t]
            if len(fail) < min_failures:
                continue
            score = np.zeros(neurons)
            for k in range(neurons):
                if measure == "gradxact":
                    score[k] = sum(float(gxa[i, k]) for i in fail) / len(fail)
                else:
                    a_f = sum(1 for i in fail if values[i, k] > threshold)
                    a_s = sum(1 for i in passing if values[i, k] > threshold)
                    score[k] = measure_loops(
                        measure, [a_s], [a_f], [len(passing) - a_s], [len(fail) - a_f]
                    )[0]
            if max(score) == min(score):
                continue
            ranks = middle_ranks_loops(score)
            best = ranks if best is None else np.minimum(best, ranks)
    return np.zeros(neurons) if best is None else -best


def aggregate_loops(scores, combine, k=10.0):
    """Rank aggregation of several localizers' ``[neurons]`` scores (middle-of-tie ranks):
    ``rrf`` ``sum_m 1 / (k + r_m)``, ``best`` ``-min_m r_m``, ``mean`` ``-mean_m r_m``."""
    ranks = [middle_ranks_loops(s) for s in scores]
    n = len(ranks[0])
    out = np.zeros(n)
    for i in range(n):
        r = [rank[i] for rank in ranks]
        if combine == "rrf":
            out[i] = sum(1.0 / (k + v) for v in r)
        elif combine == "best":
            out[i] = -min(r)
        else:
            out[i] = -sum(r) / len(r)
    return out


def repair_mask_loops(shapes, layers, neurons, part):
    """Which parameters a repair of ``neurons`` trains, element by element, from the definition.

    ``shapes``: ``{layer: {"kernel": shape, "bias": shape}}``; ``layers``: the probed layers
    in order as ``(name, units, consumer, outgoing)`` with ``outgoing`` one of "dense",
    "conv", "flatten"; ``neurons``: flat ids. A neuron's incoming weights are every
    ``kernel[..., unit]``, its bias ``bias[unit]``, its outgoing weights every consumer weight
    that reads it: ``kernel[unit, j]`` (dense), ``kernel[a, b, unit, j]`` (conv) or
    ``kernel[i, j]`` with ``i % units == unit`` (flatten). Returns boolean masks per leaf.
    """
    mask = {n: {leaf: np.zeros(s, bool) for leaf, s in v.items()} for n, v in shapes.items()}
    start = 0
    for name, units, consumer, outgoing in layers:
        for unit in range(units):
            if start + unit not in set(int(i) for i in neurons):
                continue
            if part in ("both", "incoming"):
                kernel = mask[name]["kernel"]
                for idx in np.ndindex(kernel.shape):
                    if idx[-1] == unit:
                        kernel[idx] = True
                mask[name]["bias"][unit] = True
            if part in ("both", "outgoing"):
                out = mask[consumer]["kernel"]
                for idx in np.ndindex(out.shape):
                    if outgoing == "dense" and idx[0] == unit:
                        out[idx] = True
                    elif outgoing == "conv" and idx[2] == unit:
                        out[idx] = True
                    elif outgoing == "flatten" and idx[0] % units == unit:
                        out[idx] = True
        start += units
    return mask


def adam_loops(grad_fn, params, mask, steps, lr, clip, b1=0.9, b2=0.999, eps=1e-8):
    """Adam (optax's defaults) after clipping the global gradient norm to ``clip``, on the
    parameters where ``mask`` is True, step by step in float64; ``grad_fn(t, params)``
    returns the mean gradient of step ``t`` as a dict of arrays like ``params``. Returns
    the parameters after every step (``[params after step 1, ...]``)."""
    p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(a) for k, a in p.items()}
    out = []
    for t in range(1, steps + 1):
        g = {k: np.where(mask[k], a, 0.0) for k, a in grad_fn(t - 1, p).items()}
        norm = math.sqrt(sum(float(np.sum(a * a)) for a in g.values()))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for k in p:
            gk = g[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            mhat, vhat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            p[k] = np.where(mask[k], p[k] - lr * mhat / (np.sqrt(vhat) + eps), p[k])
        out.append({k: a.copy() for k, a in p.items()})
    return out
