"""Train a Flax model with optax and log its hit spectrum after every epoch.

The spectrum rides along in the eval step with one extra line
(``spectrum = dj.update_spectrum(...)``); nothing else about the training
loop changes. Run:

    python examples/train_with_spectrum.py --epochs 5
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import deepfault_jax as dj


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dataset", default="digits")
    args = parser.parse_args(argv)

    ds = dj.load_dataset(args.dataset)
    model = dj.create_model("mlp-3x50", input_shape=ds.input_shape, num_classes=ds.num_classes)
    key, init_key = jax.random.split(jax.random.key(0))
    params = dj.init_params(init_key, model)
    probe = dj.model_probe(model, params)  # hidden Dense layers, pre-activation
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y, mask):
        def loss_fn(p):
            losses = optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y)
            return jnp.sum(losses * mask) / jnp.maximum(mask.sum(), 1)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @functools.partial(jax.jit, donate_argnums=0)
    def eval_step(spectrum, params, x, y, mask):
        logits, activations = probe(params, x)
        return dj.update_spectrum(spectrum, logits, activations, y, mask=mask)  # the extra line

    for epoch in range(args.epochs):
        key, shuffle_key = jax.random.split(key)
        for b in dj.shuffled_batches(shuffle_key, ds.x_train, ds.y_train, batch_size=64):
            params, opt_state, _ = train_step(params, opt_state, b.x, b.y, b.mask)
        spectrum = dj.init_spectrum(probe.index, num_classes=ds.num_classes)
        for b in dj.iterate_batches(ds.x_test, ds.y_test, batch_size=256):
            spectrum = eval_step(spectrum, params, b.x, b.y, b.mask)
        n_pass, n_fail = int(spectrum.n_pass.sum()), int(spectrum.n_fail.sum())
        shares = ", ".join(
            f"{r['layer']} {r['active_share_fail']:.2f}/{r['active_share_pass']:.2f}"
            if n_fail
            else f"{r['layer']} -/{r['active_share_pass']:.2f}"
            for r in dj.layer_summary(spectrum)
        )
        # neurons never active on any failing input of the test split
        silent = int(np.sum(np.asarray(spectrum.pooled().a_f) == 0))
        print(
            f"epoch {epoch + 1}: accuracy {n_pass / (n_pass + n_fail):.4f} ({n_fail} failing); "
            f"active share fail/pass: {shares}; {silent} neurons silent on failures",
            flush=True,
        )


if __name__ == "__main__":
    main()
