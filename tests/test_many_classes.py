"""100 and 1,000 classes end to end: spectra against the loop oracle, streamed and in
memory, the command line's run and repair, class-count mismatches and memory limits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import assert_identical
from reference import spectrum_loops

from deepfault_jax import checkpoints, cli, probe, sources, streaming, training, zoo
from deepfault_jax.data import make_dataset
from deepfault_jax.errors import InputError


def prototypes(classes: int, per_class: int, seed: int = 0):
    """Noisy copies of one random 8x8 prototype per class: a learnable ``classes``-way set."""
    rng = np.random.default_rng(seed)
    proto = rng.random((classes, 8, 8, 1)).astype(np.float32)

    def draw(n):
        y = np.arange(n) % classes
        x = proto[y] + 0.15 * rng.standard_normal((n, 8, 8, 1)).astype(np.float32)
        return np.clip(x, 0, 1).astype(np.float32), y.astype(np.int32)

    return (*draw(classes * per_class), *draw(classes * 2))


@pytest.fixture(scope="module", params=[100, 1000])
def many(request, tmp_path_factory):
    """A trained mlp-3x50 of ``classes`` classes, its checkpoint and its data as npz."""
    classes = request.param
    tmp = tmp_path_factory.mktemp(f"c{classes}")
    x_train, y_train, x_test, y_test = prototypes(classes, 3)
    ds = make_dataset("many", x_train, y_train, x_test, y_test, num_classes=classes)
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=classes)
    params = training.train(jax.random.key(0), model, ds, epochs=15).params
    checkpoints.save_checkpoint(tmp / "ckpt", model, params)
    np.savez(tmp / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
             num_classes=np.int64(classes))  # fmt: skip
    return classes, model, params, ds, tmp


def test_spectrum_equals_the_loop_oracle_streamed_and_in_memory(many):
    classes, model, params, ds, tmp = many
    prb = probe.model_probe(model, params)
    s = streaming.compute_spectrum(prb, params, ds.x_test, ds.y_test, batch_size=128)
    logits, values = prb(params, ds.x_test)
    acts = np.concatenate([np.asarray(values[n]) for n in prb.index.layer_names], axis=1)
    want = spectrum_loops(logits, acts, ds.y_test, num_classes=classes)
    for got, ref in zip((s.a_pass, s.a_fail, s.n_pass, s.n_fail), want, strict=True):
        np.testing.assert_array_equal(np.asarray(got), ref)
    assert s.a_pass.shape == (classes, 150) and 0 < int(s.n_fail.sum()) < len(ds.y_test)
    streamed = streaming.stream_spectrum(prb, params, sources.open_source(f"npz:{tmp / 'data.npz'}"), batch_size=96)  # fmt: skip
    assert_identical(s, streamed)


def test_run_and_repair_from_the_command_line(many, capsys):
    classes, _, _, _, tmp = many
    common = ["--checkpoint", str(tmp / "ckpt"), "--dataset", f"npz:{tmp / 'data.npz'}",
              "--no-progress", "--json"]  # fmt: skip
    assert cli.main(["run", *common, "--out", str(tmp / "run")]) == 0, capsys.readouterr().err
    report = json.loads((tmp / "run" / "report.json").read_text())
    assert report["dataset"]["num_classes"] == classes, report["dataset"]
    assert report["spectrum"]["num_pass"] + report["spectrum"]["num_fail"] == 2 * classes
    capsys.readouterr()
    code = cli.main(["repair", *common, "--out", str(tmp / "repair"), "--budget", "30"])
    assert code == 0, capsys.readouterr().err
    targeted = json.loads((tmp / "repair" / "repair.json").read_text())["results"]["targeted"]
    assert len(targeted["neurons"]) == 10
    assert targeted["validation_after"] >= targeted["validation_before"], targeted


def test_a_class_count_that_does_not_match_the_model_is_named(many, tmp_path, capsys):
    classes, _, _, ds, tmp = many
    model = zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10)
    checkpoints.save_checkpoint(tmp_path / "ten", model, zoo.init_params(jax.random.key(0), model))
    for extra in ([], ["--stream"]):
        code = cli.main(["spectrum", "--checkpoint", str(tmp_path / "ten"), "--dataset",
                         f"npz:{tmp / 'data.npz'}", "--out", str(tmp_path / "s.npz"), *extra])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and "10 classes" in err[0] and str(classes) in err[0], (
            err
        )
        assert not (tmp_path / "s.npz").exists()


def test_memory_beyond_the_device_is_refused_before_allocating():
    est = streaming.memory_estimate(1000, 4800, 256)
    assert est["spectrum"] == 2 * (2 * 1000 * 4800 + 2000) * 4 and est["attribution"] == 0
    with pytest.raises(
        InputError, match=r"1000000 classes x 500000 neurons .* needs at least .*GiB.* holds"
    ):
        streaming.check_memory(1_000_000, 500_000, 64)
