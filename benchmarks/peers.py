"""Peers for the benchmarks: the original DeepFault's algorithms ported to Python/NumPy,
and PyTorch (CPU build; never a dependency of the package) with the same weights.

Imported by ``spectrum.py`` and ``synthesis.py`` in this folder.
"""

from __future__ import annotations

import importlib.util

import numpy as np


def missing_peers() -> dict[str, str]:
    """The peers that cannot run here, each with the reason (empty when all can)."""
    if importlib.util.find_spec("torch") is None:
        return {"torch": "PyTorch is not installed (CPU build: pip install torch==2.13.0)"}
    return {}


# --------------------------------------------------------------------------- the original


def original_counts(activations: list[np.ndarray], predictions, labels, threshold: float = 0.0):
    """The original's spectrum counting, ported faithfully to Python and NumPy.

    Like DeepFault's ``construct_spectrum_matrices``: lists of correctly and wrongly
    classified input indices, then for every input a Python membership test on
    those lists and a loop over every neuron of every layer, adding one to a
    per-neuron counter. Pooled over classes, as the original. The membership test
    on a list makes the cost per input grow with the data size.

    Args:
      activations: per layer, ``[n, units]`` precomputed neuron values.
      predictions, labels: ``[n]``.

    Returns:
      ``(num_cs, num_us, num_cf, num_uf)``: lists (one per layer) of int arrays.
    """
    correct_classifications = [i for i in range(len(labels)) if predictions[i] == labels[i]]
    misclassifications = [i for i in range(len(labels)) if predictions[i] != labels[i]]
    num_cs = [np.zeros(a.shape[1], np.int64) for a in activations]
    num_us = [np.zeros(a.shape[1], np.int64) for a in activations]
    num_cf = [np.zeros(a.shape[1], np.int64) for a in activations]
    num_uf = [np.zeros(a.shape[1], np.int64) for a in activations]
    for i in range(len(labels)):
        is_correct = i in correct_classifications
        is_wrong = i in misclassifications
        for layer, values in enumerate(activations):
            row = values[i]
            for neuron in range(values.shape[1]):
                if row[neuron] > threshold:
                    if is_correct:
                        num_cs[layer][neuron] += 1
                    elif is_wrong:
                        num_cf[layer][neuron] += 1
                else:
                    if is_correct:
                        num_us[layer][neuron] += 1
                    elif is_wrong:
                        num_uf[layer][neuron] += 1
    return num_cs, num_us, num_cf, num_uf


# --------------------------------------------------------------------------- PyTorch


def torch_model(model, params):
    """The zoo model ``model`` as a ``torch.nn.Module`` with ``params`` copied in (NCHW inside,
    NHWC-ordered flattening so the Dense weights carry over unchanged)."""
    import torch
    from torch import nn

    act = nn.ReLU() if model.activation == "relu" else nn.LeakyReLU(0.01)
    layers = []
    names = []

    def linear(p):
        m = nn.Linear(*np.asarray(p["kernel"]).shape)
        m.weight.data = torch.from_numpy(np.asarray(p["kernel"]).T.copy())
        m.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
        return m

    def conv(p):
        k = np.asarray(p["kernel"])  # [kh, kw, in, out]
        m = nn.Conv2d(k.shape[2], k.shape[3], k.shape[:2], padding="same")
        m.weight.data = torch.from_numpy(k.transpose(3, 2, 0, 1).copy())
        m.bias.data = torch.from_numpy(np.asarray(p["bias"]).copy())
        return m

    conv_names = sorted((n for n in params if n.startswith("conv_")), key=lambda n: int(n[5:]))
    dense_names = sorted((n for n in params if n.startswith("dense_")), key=lambda n: int(n[6:]))
    blocks = {"lenet1": [1, 1], "lenet4": [1, 1], "lenet5": [1, 1], "cifar-convnet": [2, 2]}.get(
        model.name, []
    )

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList([conv(params[n]) for n in conv_names])
            self.dense = nn.ModuleList([linear(params[n]) for n in dense_names])
            self.logits = linear(params["logits"])
            self.act = act

        def forward(self, x):  # x: NCHW
            i = 0
            for size in blocks:
                for _ in range(size):
                    x = self.act(self.convs[i](x))
                    i += 1
                x = nn.functional.max_pool2d(x, 2, 2)
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)
            for layer in self.dense:
                x = self.act(layer(x))
            return self.logits(x)

    net = Net().eval()
    hidden = list(net.convs) + list(net.dense)
    names = conv_names + dense_names
    del layers
    return net, hidden, names


class TorchSpectrum:
    """Forward hooks on the hidden Conv/Linear modules, counting the all-class spectrum.

    The counting is written without bool tensors (compiled bool writes are slow):
    activity and pass/fail slots are float 0/1 tensors and the counts one matmul.
    """

    def __init__(self, net, hidden, num_classes: int, *, compile: bool = False):
        import torch

        self.torch = torch
        self.net = net
        self.num_classes = num_classes
        self.captured: list = []
        for module in hidden:
            module.register_forward_hook(lambda _m, _i, out: self.captured.append(out))
        neurons = sum(
            m.out_features if hasattr(m, "out_features") else m.out_channels for m in hidden
        )
        self.counts = torch.zeros(2 * num_classes, neurons, dtype=torch.float64)
        self.step = torch.compile(self._step) if compile else self._step

    def _step(self, x, y):
        torch = self.torch
        self.captured.clear()
        logits = self.net(x)
        acts = [a.mean(dim=(2, 3)) if a.dim() == 4 else a for a in self.captured]
        active = torch.cat([(a > 0).to(torch.float32) for a in acts], dim=1)
        correct = (logits.argmax(dim=1) == y).to(torch.int64)
        slot = y + self.num_classes * (1 - correct)
        weights = torch.nn.functional.one_hot(slot, 2 * self.num_classes).to(torch.float32)
        return weights.T @ active

    def run(self, batches):
        torch = self.torch
        with torch.no_grad():
            for x, y in batches:
                self.counts += self.step(x, y).to(torch.float64)
        return self.counts

    def activations(self, x):
        """Per-layer probed values (pre-activation, conv channels spatially averaged)."""
        torch = self.torch
        with torch.no_grad():
            self.captured.clear()
            self.net(x)
            return [(a.mean(dim=(2, 3)) if a.dim() == 4 else a).numpy() for a in self.captured]
