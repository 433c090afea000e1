"""100 and 1,000 classes end to end: spectra against the loop oracle, streamed and in
memory, the command line's run and repair, class-count mismatches and memory limits."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import assert_identical
from reference import spectrum_loops

from deepfault_jax import (
    checkpoints,
    cli,
    measures,
    probe,
    sources,
    spectrum,
    spectrum_io,
    streaming,
    training,
    zoo,
)
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


# --------------------------------------------------------------------------- rows: pooled, subsets


def test_pooled_only_and_class_subsets_equal_the_full_spectrum(many, tmp_path):
    classes, model, params, ds, _ = many
    prb = probe.model_probe(model, params)
    x, y = ds.x_test, ds.y_test
    full = streaming.compute_spectrum(prb, params, x, y, batch_size=128, attribution=True)
    pooled = streaming.compute_spectrum(prb, params, x, y, batch_size=77, attribution=True,
                                        classes="pooled")  # fmt: skip
    assert pooled.a_pass.shape == (1, 150) and pooled.pooled_only
    for a, b in zip(full.pooled(), pooled.pooled(), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fs, ps = full.attribution_sums(pooled=True), pooled.attribution_sums(pooled=True)
    np.testing.assert_array_equal(fs.fixes, ps.fixes)
    np.testing.assert_allclose(fs.gxa_fail, ps.gxa_fail, rtol=1e-5, atol=1e-4)
    subset = [classes - 1, 0, 7]
    sub = streaming.compute_spectrum(prb, params, x, y, batch_size=50, classes=subset)
    assert sub.a_pass.shape == (3, 150) and sub.class_ids == tuple(subset)
    for c in subset:
        for a, b in zip(full.for_class(c), sub.for_class(c), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert sub.num_inputs == int(np.isin(y, subset).sum())
    with pytest.raises(InputError, match=r"class must be one of the spectrum's classes"):
        sub.for_class(1)
    with pytest.raises(InputError, match="pooled-only"):
        pooled.for_class(0)
    path = spectrum_io.save_spectrum(tmp_path / "sub.npz", sub)
    back = spectrum_io.load_spectrum(path)
    assert back.classes == tuple(subset)
    assert_identical(sub, back)
    with pytest.raises(InputError, match=r"expected rows of classes .*, got every class"):
        spectrum.merge_spectra(sub, full)
    with pytest.raises(InputError, match=rf"classes must lie in \[0, {classes}\)"):
        streaming.compute_spectrum(prb, params, x, y, classes=[classes])


def test_cli_classes_and_localize_on_a_subset(many, tmp_path, capsys):
    classes, _, _, _, tmp = many
    common = ["--checkpoint", str(tmp / "ckpt"), "--dataset", f"npz:{tmp / 'data.npz'}",
              "--no-progress"]  # fmt: skip
    out = tmp_path / "sub.npz"
    assert cli.main(["spectrum", *common, "--classes", "5,3", "--out", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == [5, 3]
    assert cli.main(["localize", "--spectrum", str(out), "--method", "ochiai", "--class", "3",
                     "--k", "4", "--json"]) == 0  # fmt: skip
    ranked = json.loads(capsys.readouterr().out)
    sub = spectrum_io.load_spectrum(out)
    want = np.argsort(-np.asarray(measures.get_measure("ochiai")(sub.for_class(3))), kind="stable")[
        :4
    ]
    assert [r["id"] for r in ranked["neurons"]] == want.tolist(), ranked["neurons"]
    assert ranked["class"] == 3 and ranked["counted_classes"] == [5, 3]
    assert cli.main(["localize", "--spectrum", str(out), "--method", "ochiai", "--k", "4"]) == 0
    assert "(classes [5, 3] pooled)" in capsys.readouterr().out.splitlines()[0]
    code = cli.main(["localize", "--spectrum", str(out), "--method", "ochiai", "--class", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "one of the spectrum's classes [5, 3]" in err[0], err
    for bad, fragment in (("5,x", "comma-separated class ids"), ("5,5", "distinct"),
                          (str(classes), f"[0, {classes})")):  # fmt: skip
        code = cli.main(["spectrum", *common, "--classes", bad, "--out", str(tmp_path / "b.npz")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
