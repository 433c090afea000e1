"""Synthesis throughput for k suspicious neurons: deepfault-jax batched against the original's
way and PyTorch autograd, in both modes.

* ``ours``:     ``synthesis.synthesize`` jitted over fixed-shape batches (one
                backward pass per step for the whole batch and all k neurons);
* ``original``: the original's way in JAX: per input, one gradient per suspicious
                neuron, unbatched, a new (eager) ``jax.grad`` for every pair as the
                original builds a new Keras gradient function for each; timed on
                ``--eager-inputs`` inputs;
* ``original-jit``: the same way with one compiled gradient reused for every pair,
                timed on ``--original-inputs`` inputs;
* ``torch``:    PyTorch autograd, batched: hooks capture the probed values, the mean
                of each input's set is summed and back-propagated once per step.

The synthesized inputs of the three agree (checked on the first inputs). PyTorch is
never a dependency of the package: without it the ``torch`` peer is skipped, with a note
(its numbers are then null in ``--json``).

    python benchmarks/synthesis.py --quick
    python benchmarks/synthesis.py --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from deepfault_jax import data, probe, synthesis, zoo

sys.path.insert(0, str(Path(__file__).parent))
import peers  # noqa: E402


def _time(run, repeats):
    """Median of ``repeats`` timed runs after a warm-up run; with 0, the one run is timed."""
    if repeats == 0:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, mode: str, *, n: int, k: int, batch_size: int, steps: int, repeats: int,
          original_inputs: int, eager_inputs: int = 2, torch_peer: bool = True) -> dict:  # fmt: skip
    x, y = _inputs(name, n)
    model = zoo.create_model(name, input_shape=x.shape[1:], num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    prb = probe.model_probe(model, params)
    table = np.stack([np.arange(c, c + k) * 7 % prb.index.num_neurons for c in range(10)]).astype(
        np.int32
    )
    d, step_size = 0.1, (1.0 if mode == "deepfault" else 2.5 * 0.1 / steps)
    synth = synthesis.make_synthesizer(
        prb, mode=mode, d=d, step_size=step_size, steps=steps, direction="raw"
    )
    run_batch = jax.jit(synthesis.synthesize, static_argnums=0)
    batches = list(data.iterate_batches(x, y, batch_size=batch_size))
    out = {}

    def ours():
        out["ours"] = [run_batch(synth, params, b.x, b.y, table) for b in batches]
        jax.block_until_ready(out["ours"])

    t_ours = _time(ours, repeats)

    # the original's way: per input, per neuron, unbatched gradients. As the
    # original builds a new gradient function for every (input, neuron) pair
    # (Keras K.gradients + K.function), "original" takes an eager jax.grad per call;
    # "original-jit" reuses one compiled gradient, a faster variant of the same way.
    jitted = jax.jit(jax.grad(lambda x1, nid: prb.flat(params, x1)[1][0, nid]))

    def eager(x1, nid):
        return jax.grad(lambda z: prb.flat(params, z)[1][0, nid])(x1)

    def original_one(x1, ids, value):
        x0 = x1
        for _ in range(synth.num_steps):
            g = jnp.mean(jnp.stack([value(x1, int(nid)) for nid in ids]), axis=0)
            if mode == "deepfault":
                x1 = jnp.clip(x0 + jnp.clip(step_size * g, -d, d), 0, 1)
            else:
                x1 = jnp.clip(jnp.clip(x1 + step_size * g, x0 - d, x0 + d), 0, 1)
        return x1

    m = min(original_inputs, n)
    m_eager = max(1, min(m, eager_inputs))

    def original():
        out["original"] = [
            jax.block_until_ready(original_one(x[i : i + 1], table[y[i]], eager))
            for i in range(m_eager)
        ]

    def original_jit():
        out["original-jit"] = [
            jax.block_until_ready(original_one(x[i : i + 1], table[y[i]], jitted)) for i in range(m)
        ]

    t_original = _time(original, 0)
    t_original_jit = _time(original_jit, 1)
    ours_x = np.concatenate([np.asarray(o) for o in out["ours"]])[:n]
    orig_x = np.concatenate([np.asarray(o) for o in out["original"]])
    result = {
        "model": name, "mode": mode, "k": k, "inputs": n, "batch_size": batch_size, "steps": synth.num_steps,
        "ours_inputs_per_second": n / t_ours,
        "original_inputs_per_second": m_eager / t_original,
        "original_jit_inputs_per_second": m / t_original_jit,
        "torch_inputs_per_second": None,
        "max_abs_difference_torch": None,
        "max_abs_difference_original": float(np.abs(ours_x[:m_eager] - orig_x).max()),
    }  # fmt: skip
    result["ratio_ours_over_original_jit"] = (
        result["ours_inputs_per_second"] / result["original_jit_inputs_per_second"]
    )
    result["ratio_ours_over_original"] = (
        result["ours_inputs_per_second"] / result["original_inputs_per_second"]
    )
    result["ratio_ours_over_torch"] = None
    if not torch_peer:
        return result

    import torch

    torch.set_num_threads(2)
    net, hidden, _ = peers.torch_model(model, params)
    captured = []
    for module in hidden:
        module.register_forward_hook(lambda _m, _i, o: captured.append(o))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    sets = torch.from_numpy(table[y].astype(np.int64))

    def torch_batch(x0, s):
        x1 = x0.clone()
        for _ in range(synth.num_steps):
            x1.requires_grad_(True)
            captured.clear()
            net(x1)
            flat = torch.cat([a.mean(dim=(2, 3)) if a.dim() == 4 else a for a in captured], dim=1)
            objective = flat.gather(1, s).mean(dim=1).sum()
            (g,) = torch.autograd.grad(objective, x1)
            with torch.no_grad():
                if mode == "deepfault":
                    x1 = (x0 + (step_size * g).clamp(-d, d)).clamp(0, 1)
                else:
                    x1 = torch.minimum(torch.maximum(x1 + step_size * g, x0 - d), x0 + d).clamp(
                        0, 1
                    )
        return x1.detach()

    def run_torch():
        out["torch"] = [
            torch_batch(xt[i : i + batch_size], sets[i : i + batch_size])
            for i in range(0, n, batch_size)
        ]

    t_torch = _time(run_torch, repeats)
    torch_x = np.concatenate([t.numpy().transpose(0, 2, 3, 1) for t in out["torch"]])
    result["torch_inputs_per_second"] = n / t_torch
    result["max_abs_difference_torch"] = float(np.abs(ours_x - torch_x).max())
    result["ratio_ours_over_torch"] = (
        result["ours_inputs_per_second"] / result["torch_inputs_per_second"]
    )
    return result


def _inputs(name, n):
    if name != "cifar-convnet" and data.FASHION_MNIST_DIR.is_dir():
        ds = data.load_dataset("fashion-mnist")
        return ds.x_test[:n], ds.y_test[:n]
    rng = np.random.default_rng(0)
    shape = (32, 32, 3) if name == "cifar-convnet" else (28, 28, 1)
    return rng.random((n, *shape), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="mlp-3x50,lenet5")
    parser.add_argument("--modes", default="deepfault,pgd")
    parser.add_argument("--inputs", type=int, default=2048)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="pgd steps (default 10)")
    parser.add_argument(
        "--original-inputs", type=int, default=20, help="inputs timed the original's way"
    )
    parser.add_argument(
        "--eager-inputs", type=int, default=2, help="inputs timed the original's way, eager"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="512 inputs, 5 the original's way")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.inputs, args.original_inputs, args.repeats = 512, 5, 2
    skipped = peers.missing_peers()
    notes = [f"{peer} skipped: {reason}" for peer, reason in skipped.items()]
    for note in notes:  # with --json on stderr: stdout stays one JSON object
        print(f"note: {note}", file=sys.stderr if args.json else sys.stdout, flush=True)
    results = [
        bench(
            m,
            mode,
            n=args.inputs,
            k=args.k,
            batch_size=args.batch_size,
            steps=args.steps,
            repeats=args.repeats,
            original_inputs=args.original_inputs,
            eager_inputs=args.eager_inputs,
            torch_peer="torch" not in skipped,
        )  # fmt: skip
        for m in args.models.split(",")
        for mode in args.modes.split(",")
    ]
    report = {"benchmark": "synthesis", "machine": platform.platform(), "cpus": __import__("os").cpu_count(),
              "jax": jax.__version__, "date": time.strftime("%Y-%m-%d"), "skipped_peers": skipped,
              "results": results}  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"synthesis, inputs/s, k = {args.k}, batch {args.batch_size}")
    print(f"{'model':<10} {'mode':<9} {'ours':>9} {'original':>9} {'orig-jit':>9} {'torch':>9} "
          f"{'ours/orig':>10} {'ours/orig-jit':>13} {'ours/torch':>10}")  # fmt: skip

    def num(value, spec):
        return "-" if value is None else format(value, spec)

    for r in results:
        print(f"{r['model']:<10} {r['mode']:<9} {r['ours_inputs_per_second']:>9.0f} "
              f"{r['original_inputs_per_second']:>9.2f} {r['original_jit_inputs_per_second']:>9.1f} "
              f"{num(r['torch_inputs_per_second'], '.0f'):>9} {r['ratio_ours_over_original']:>10.0f} "
              f"{r['ratio_ours_over_original_jit']:>13.0f} {num(r['ratio_ours_over_torch'], '.2f'):>10}"
              f"   (max |diff| vs torch {num(r['max_abs_difference_torch'], '.1e')}, vs original "
              f"{r['max_abs_difference_original']:.1e})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
