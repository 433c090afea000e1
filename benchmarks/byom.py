"""Keras models against the zoo: the same weights, the same spectrum, and the throughput.

For each zoo architecture with a Keras twin (``mlp-3x50``: Flatten, 3 x Dense 50
relu, Dense; ``lenet5``: Conv2D 6 5x5 same relu, MaxPooling 2x2 same, Conv2D 16,
MaxPooling, Flatten, Dense 120, Dense 84, Dense), the zoo model's trained
parameters are copied into the Keras model, the Keras model is saved as ``.keras``
and loaded back as a user's would be (:func:`deepfault_jax.load_keras_model`),
and both are probed (``values="pre"``, conv channels by their mean). The
spectra of the inputs (the first --inputs of the training split) must be equal cell for cell; then
:func:`deepfault_jax.compute_spectrum` over the same inputs is timed for

* ``zoo``:       the zoo model's probe as every command builds it (on the CPU,
                 with its shifted-multiply convolution and padded Dense);
* ``zoo-plain``: the zoo model with the plain Flax layers (``fast_conv=False,
                 fast_dense=False``): the like-for-like comparison;
* ``keras``:     the Keras probe (its layers run through Keras ops on JAX);

median of ``--repeats`` calls after a warm-up call, samples per second, and
the ratio keras / zoo.

    python benchmarks/byom.py --quick
    python benchmarks/byom.py --models mlp-3x50,lenet5 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import deepfault_jax as dj
from deepfault_jax import checkpoints, keras_models
from deepfault_jax.neuron_params import layer_order


def keras_twin(keras, name: str, model: dj.Model):
    """The Keras model of zoo architecture ``name`` (linen layouts: ``mlp-*``, ``lenet*``)."""
    L = keras.layers
    act = model.activation
    layers = [keras.Input(model.input_shape)]
    if name.startswith("mlp-"):
        depth, width = (int(v) for v in name[4:].split("x"))
        layers += [L.Flatten()] + [L.Dense(width, activation=act) for _ in range(depth)]
    elif name == "lenet5":
        for channels in (6, 16):
            layers += [L.Conv2D(channels, 5, padding="same", activation=act),
                       L.MaxPooling2D(2, padding="same")]  # fmt: skip
        layers += [L.Flatten(), L.Dense(120, activation=act), L.Dense(84, activation=act)]
    else:
        raise SystemExit(f"no Keras twin of {name}")
    layers.append(L.Dense(model.num_classes))
    return keras.Sequential(layers)


def copy_weights(kmodel, params) -> None:
    """Zoo parameters (in call order: conv_*, dense_*, logits) into the Keras layers."""
    tree = params.get("params", params)
    names = sorted(tree, key=layer_order)  # conv_*, dense_* in natural order, then logits
    weighted = [layer for layer in kmodel.layers if layer.weights]
    assert len(weighted) == len(names), (len(weighted), names)
    for layer, name in zip(weighted, names, strict=True):
        layer.set_weights([np.asarray(tree[name]["kernel"]), np.asarray(tree[name]["bias"])])


def timed(fn, repeats: int) -> tuple[float, float]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp-3x50,lenet5")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--inputs", type=int, default=30000, help="training inputs")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="mlp-3x50, 2,048 inputs, 2 repeats")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.inputs, args.repeats = "mlp-3x50", 2048, 2
    keras = keras_models.require_keras()
    ds = dj.load_dataset(args.dataset)
    x, y = ds.x_train[: args.inputs], ds.y_train[: args.inputs]
    rows = []
    for name in args.models.split(","):
        model, params, _ = checkpoints.load_or_train(name, ds, seed=0)
        twin = keras_twin(keras, name, model)
        copy_weights(twin, params)
        with tempfile.TemporaryDirectory() as tmp:
            twin.save(Path(tmp) / "twin.keras")
            loaded = dj.load_keras_model(Path(tmp) / "twin.keras")
        kprobe, kparams, _ = dj.keras_probe(loaded, values="pre")
        probes = {
            "zoo": (dj.model_probe(model, params), params),
            "zoo-plain": (
                dj.model_probe(model, params, fast_conv=False, fast_dense=False),
                params,
            ),  # fmt: skip
            "keras": (kprobe, kparams),
        }
        spectra = {}
        row = {"model": name, "inputs": len(y), "batch_size": args.batch_size}
        for impl, (prb, prm) in probes.items():

            def call(prb=prb, prm=prm):
                return dj.compute_spectrum(prb, prm, x, y, batch_size=args.batch_size)

            spectra[impl] = call()
            first, median = timed(call, args.repeats)
            row[impl] = {"first_s": first, "median_s": median, "samples_per_s": len(y) / median}
        ref = spectra["zoo"]
        row["cells_differing"] = {
            impl: int(sum(np.sum(np.asarray(a) != np.asarray(b))
                          for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(s), strict=True)))
            for impl, s in spectra.items() if impl != "zoo"
        }  # fmt: skip
        row["keras_over_zoo"] = row["keras"]["samples_per_s"] / row["zoo"]["samples_per_s"]
        row["keras_over_zoo_plain"] = (
            row["keras"]["samples_per_s"] / row["zoo-plain"]["samples_per_s"]
        )
        rows.append(row)
        if not args.json:
            print(f"{name}: zoo {row['zoo']['samples_per_s']:,.0f}/s, zoo-plain "
                  f"{row['zoo-plain']['samples_per_s']:,.0f}/s, keras "
                  f"{row['keras']['samples_per_s']:,.0f}/s; keras/zoo "
                  f"{row['keras_over_zoo']:.2f}, keras/zoo-plain "
                  f"{row['keras_over_zoo_plain']:.2f}; cells differing "
                  f"{row['cells_differing']}", flush=True)  # fmt: skip
    differing = [r["model"] for r in rows if any(r["cells_differing"].values())]
    if differing:
        print(f"spectra differ from the zoo model's on {', '.join(differing)}", file=sys.stderr)
    if args.json:
        result = {"rows": rows, "machine": platform.processor() or platform.machine(),
                  "versions": checkpoints.package_versions(), "keras": keras.__version__}  # fmt: skip
        print(json.dumps(result, sort_keys=True))
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
