"""Attribution sums in the spectrum pass, attribution measures, probe gates and exact ablation."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import mlp_attribution_loops

from deepfault_jax import (
    ablation,
    attribution,
    localize,
    measures,
    probe,
    spectrum,
    spectrum_io,
    streaming,
    training,
    zoo,
)

FIELDS = ("act_pass", "act_fail", "gxa_pass", "gxa_fail", "fixes", "breaks")
# float sums over different batch sizes or devices: equal to this share of the
# largest magnitude of the array (float32 rounding of sums of a few hundred terms)
SUM_RTOL = 1e-5


@pytest.fixture(scope="module")
def trained_mlp(digits):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    return model, training.train(jax.random.key(0), model, digits, epochs=3).params


@pytest.fixture(scope="module")
def trained_lenet(digits):
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    return model, training.train(jax.random.key(0), model, digits, epochs=2).params


def _attr(s: spectrum.Spectrum) -> dict[str, np.ndarray]:
    return {f: np.asarray(getattr(s.attribution, f)) for f in FIELDS}


def assert_close_sums(a: spectrum.Spectrum, b: spectrum.Spectrum):
    """Counts and fix/break counts identical; float sums equal within SUM_RTOL."""
    for name in ("a_pass", "a_fail", "n_pass", "n_fail"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    x, y = _attr(a), _attr(b)
    for f in ("fixes", "breaks"):
        assert x[f].dtype == np.int32
        np.testing.assert_array_equal(x[f], y[f])
    for f in ("act_pass", "act_fail", "gxa_pass", "gxa_fail"):
        scale = max(float(np.abs(x[f]).max()), 1e-30)
        np.testing.assert_allclose(x[f], y[f], rtol=0, atol=SUM_RTOL * scale)


# --------------------------------------------------------------------------- gates


@pytest.mark.parametrize("name", ["mlp-3x50", "lenet5", "nnx-mlp-3x50", "cifar-convnet"])
@pytest.mark.parametrize("conv_reduce", ["mean", "none"])
def test_gates_of_one_are_the_plain_model_and_zero_ablates(name, conv_reduce):
    shape = (32, 32, 3) if name == "cifar-convnet" else (8, 8, 1)
    model = zoo.create_model(name, input_shape=shape, num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    prb = probe.model_probe(model, params, conv_reduce=conv_reduce)
    x = jax.random.uniform(jax.random.key(1), (6, *shape))
    logits, acts = jax.jit(prb.fn)(params, x)
    gated = jax.jit(prb.gated)
    logits1, acts1 = gated(params, x, prb.ones(6))
    np.testing.assert_allclose(logits1, logits, rtol=1e-6, atol=1e-6)
    for layer in acts:
        np.testing.assert_allclose(acts1[layer], acts[layer], rtol=1e-6, atol=1e-6)
    # a whole layer gated to 0 makes the model's output depend on nothing before it
    last = prb.index.layer_names[-1]
    zero = {last: jnp.zeros((1, prb.index.layer_sizes[-1]))}
    out_a, _ = gated(params, x, zero)
    out_b, _ = gated(params, x[::-1], zero)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-6, atol=1e-6)


def test_gate_zero_equals_zeroed_weights(trained_mlp, digits):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    unit = 7
    gates = prb.ones(1)
    gates["dense_1"] = gates["dense_1"].at[0, unit].set(0.0)
    got, _ = prb.gated(params, digits.x_test[:50], gates)
    zeroed = jax.tree.map(np.array, params)
    zeroed["dense_1"]["kernel"][:, unit] = 0.0
    zeroed["dense_1"]["bias"][unit] = 0.0
    want = model.apply(zeroed, digits.x_test[:50])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gates_errors(trained_mlp):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    x = jnp.zeros((2, 8, 8, 1))
    with pytest.raises(ValueError, match=r"gates must name probed layers .*got \['logits'\]"):
        prb.gated(params, x, {"logits": jnp.ones((1, 10))})
    with pytest.raises(ValueError, match=r"gate of 'dense_0' must have shape \[batch or 1, 50\]"):
        prb.gated(params, x, {"dense_0": jnp.ones((1, 49))})

    class Sown(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(4)(x.reshape(len(x), -1))
            self.sow("intermediates", "h", h)
            return nn.Dense(3)(jax.nn.relu(h))

    module = Sown()
    sown_params = module.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)))["params"]
    sown = probe.linen_probe(module, sown_params, input_shape=(2, 2, 1), sown=True)
    assert sown.gated is None
    with pytest.raises(ValueError, match="attribution='margin' needs a probe that can gate"):
        streaming.accumulate_spectrum(sown, sown_params, [], attribution=True)
    with pytest.raises(ValueError, match="exact ablation needs a probe that can gate"):
        ablation.exact_ablation(sown, sown_params, np.zeros((2, 2, 2, 1)), np.zeros(2, int))
    plain_fn = probe.function_probe(
        lambda p, x: (x.reshape(len(x), -1)[:, :3], {"h": x.reshape(len(x), -1)}),
        None,
        input_shape=(2, 2, 1),
    )
    assert plain_fn.gated is None


def test_function_probe_with_gated_fn_matches_linen(trained_mlp, digits):
    model, params = trained_mlp
    linen = probe.model_probe(model, params, fast_dense=False)

    def forward(p, x, edit=lambda name, v: v):
        h = x.reshape(len(x), -1)
        acts = {}
        for i in range(3):
            z = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
            acts[f"dense_{i}"] = z
            h = jax.nn.relu(edit(f"dense_{i}", z))
        return h @ p["logits"]["kernel"] + p["logits"]["bias"], acts

    fn = probe.function_probe(
        forward, params, input_shape=(8, 8, 1), gated_fn=lambda p, x, edit: forward(p, x, edit)[0]
    )
    a = streaming.compute_spectrum(fn, params, digits.x_test, digits.y_test, attribution=True)
    b = streaming.compute_spectrum(linen, params, digits.x_test, digits.y_test, attribution=True)
    assert_close_sums(a, b)


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("linearised", attribution.LINEARISED)
def test_attribution_sums_equal_the_finite_difference_reference(trained_mlp, digits, linearised):
    model, params = trained_mlp
    x, y = digits.x_test[:160], digits.y_test[:160]
    prb = probe.model_probe(model, params)
    s = streaming.compute_spectrum(prb, params, x, y, batch_size=64, attribution=linearised)
    assert s.attribution.linearised == linearised
    layers = [(params[f"dense_{i}"]["kernel"], params[f"dense_{i}"]["bias"]) for i in range(3)]
    layers.append((params["logits"]["kernel"], params["logits"]["bias"]))
    ref = mlp_attribution_loops(x, y, layers, lambda z: np.maximum(z, 0.0), num_classes=10,
                                linearised=linearised)  # fmt: skip
    got = _attr(s)
    assert int(s.n_fail.sum()) > 5  # failing inputs exist, so every sum is exercised
    assert ref["fixes"].sum() > 0 and ref["breaks"].sum() > 0
    np.testing.assert_array_equal(got["fixes"], ref["fixes"])
    np.testing.assert_array_equal(got["breaks"], ref["breaks"])
    for f in ("act_pass", "act_fail", "gxa_pass", "gxa_fail"):
        scale = float(np.abs(ref[f]).max())
        np.testing.assert_allclose(got[f], ref[f], rtol=0, atol=1e-4 * scale)


def test_conv_channel_attribution_equals_finite_differences_of_its_gate(trained_lenet, digits):
    model, params = trained_lenet
    x, y = digits.x_test[:40], digits.y_test[:40]
    prb = probe.model_probe(model, params)
    s = streaming.compute_spectrum(prb, params, x, y, batch_size=40, attribution=True)
    logits, _ = prb(params, x)
    residual = np.asarray(jax.nn.softmax(logits)) - np.eye(10)[y]
    # central differences of the gate in float64: the logits are piecewise linear in
    # a gate (relu, max pooling), so a small step gives the derivative exactly
    # unless a kink lies within it
    step = 1e-5
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x64 = jnp.asarray(x, jnp.float64)
        gated = jax.jit(prb.gated)
        for layer in prb.index.layer_names:
            for unit in range(prb.index.layer_sizes[prb.index.layer_names.index(layer)]):
                nid = prb.index.neuron_id(layer, unit)

                def at(value, layer=layer, unit=unit):
                    gates = {k: jnp.asarray(v, jnp.float64) for k, v in prb.ones(1).items()}
                    gates[layer] = gates[layer].at[0, unit].set(value)
                    return np.asarray(gated(params64, x64, gates)[0], np.float64)

                jac = (at(1 + step) - at(1 - step)) / (2 * step)
                gxa = np.einsum("bc,bc->b", jac, residual)
                want = np.zeros(10)
                np.add.at(want, y, gxa)
                got = np.asarray(s.attribution.gxa_pass[:, nid] + s.attribution.gxa_fail[:, nid])
                np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_counts_of_an_attribution_pass_equal_the_count_only_pass(trained_mlp, digits):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    a = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, attribution=True)
    b = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test)
    for name in ("a_pass", "a_fail", "n_pass", "n_fail"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert b.attribution is None


@pytest.mark.parametrize("linearised", attribution.LINEARISED)
@pytest.mark.parametrize("model_fixture", ["trained_mlp", "trained_lenet"])
def test_attribution_agrees_across_batch_sizes_and_devices(
    model_fixture, linearised, request, digits
):
    model, params = request.getfixturevalue(model_fixture)
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    base = streaming.compute_spectrum(prb, params, x, y, batch_size=128, attribution=linearised)
    assert int(base.n_fail.sum()) > 0 and int(base.attribution.fixes.sum()) > 0
    for batch_size in (7, 449):
        again = streaming.compute_spectrum(prb, params, x, y, batch_size=batch_size,
                                          attribution=linearised)  # fmt: skip
        assert_close_sums(base, again)
    mesh = streaming.data_mesh(devices=4)
    sharded = streaming.compute_spectrum(prb, params, x, y, batch_size=64, mesh=mesh,
                                        attribution=linearised)  # fmt: skip
    assert_close_sums(base, sharded)


def test_two_processes_over_loopback_agree_with_one(tmp_path, digits):
    from test_spectrum import run_two_processes

    two = run_two_processes(tmp_path / "two.npz", "margin")
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(7), model)  # as in multiprocess_worker.py
    one = streaming.compute_spectrum(probe.model_probe(model, params), params, digits.x_test,
                                    digits.y_test, batch_size=32, attribution="margin")  # fmt: skip
    assert two.attribution.linearised == "margin"
    assert int(one.attribution.fixes.sum()) + int(one.attribution.breaks.sum()) > 0
    assert_close_sums(one, two)


def test_margin_and_all_classes_agree_where_they_must(trained_mlp, digits):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    a = streaming.compute_spectrum(prb, params, x, y, attribution="margin").attribution
    b = streaming.compute_spectrum(prb, params, x, y, attribution="all-classes").attribution
    for f in ("act_pass", "act_fail", "gxa_pass", "gxa_fail"):
        scale = float(np.abs(np.asarray(getattr(b, f))).max())
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=0, atol=SUM_RTOL * scale)
    # the margin ignores a third class overtaking: a fix of all classes is a fix of the
    # margin, a break of the margin is a break of all classes
    fa, fb = np.asarray(a.fixes), np.asarray(b.fixes)
    ba, bb = np.asarray(a.breaks), np.asarray(b.breaks)
    assert (fa >= fb).all() and (ba <= bb).all()
    assert fb.sum() > 0 and bb.sum() > 0
    with pytest.raises(ValueError, match="attribution must be True, False or one of margin"):
        streaming.compute_spectrum(prb, params, x, y, attribution="exact")


def test_resume_and_merge_keep_attribution(trained_mlp, digits, tmp_path):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    whole = streaming.compute_spectrum(prb, params, x, y, batch_size=64, attribution=True)
    path = tmp_path / "partial.npz"

    class Stop(Exception):
        pass

    def stop_after_three(done, _):
        if done == 3:
            raise Stop

    with pytest.raises(Stop):
        streaming.compute_spectrum(prb, params, x, y, batch_size=64, attribution=True,
                                  checkpoint_path=path, checkpoint_every=1,
                                  callback=stop_after_three)  # fmt: skip
    resumed = streaming.compute_spectrum(prb, params, x, y, batch_size=32, attribution=True,
                                        checkpoint_path=path)  # fmt: skip
    assert_close_sums(whole, resumed)
    with pytest.raises(
        ValueError, match="expected a spectrum without attribution sums, got one with 'margin'"
    ):
        streaming.compute_spectrum(prb, params, x, y, checkpoint_path=path)
    first = streaming.compute_spectrum(prb, params, x[:200], y[:200], attribution=True)
    second = streaming.compute_spectrum(prb, params, x[200:], y[200:], attribution=True)
    assert_close_sums(whole, spectrum.merge_spectra(first, second))
    plain = streaming.compute_spectrum(prb, params, x[200:], y[200:])
    with pytest.raises(
        ValueError, match="cannot merge: expected a spectrum with 'margin' attribution"
    ):
        spectrum.merge_spectra(first, plain)
    full = streaming.compute_spectrum(prb, params, x[200:], y[200:], attribution="all-classes")
    with pytest.raises(ValueError, match="got one with 'all-classes' attribution sums"):
        spectrum.merge_spectra(first, full)


def test_update_refuses_a_spectrum_with_attribution_sums(trained_mlp, digits):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    s = spectrum.init_spectrum(prb.index, num_classes=10, attribution=True)
    logits, acts = prb(params, digits.x_test[:8])
    with pytest.raises(ValueError, match="update adds counts only"):
        spectrum.update_spectrum(s, logits, acts, digits.y_test[:8])


def test_save_load_round_trip_and_damaged_files(trained_mlp, digits, tmp_path):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    s = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, attribution=True)
    path = spectrum_io.save_spectrum(tmp_path / "s.npz", s)
    back = spectrum_io.load_spectrum(path)
    for f in FIELDS:
        got, want = np.asarray(getattr(back.attribution, f)), np.asarray(getattr(s.attribution, f))
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    layer = back.layer("dense_1")
    np.testing.assert_array_equal(
        layer.attribution.fixes, np.asarray(s.attribution.fixes)[:, 50:100]
    )
    with np.load(path) as f:
        arrays = dict(f)
    del arrays["attribution_breaks"]
    np.savez(tmp_path / "partial.npz", **arrays)
    with pytest.raises(ValueError, match="attribution sums must be whole"):
        spectrum_io.load_spectrum(tmp_path / "partial.npz")
    arrays["attribution_breaks"] = np.zeros((10, 3), np.int32)
    np.savez(tmp_path / "shape.npz", **arrays)
    with pytest.raises(
        ValueError, match=r"attribution_breaks must be integer of shape \(10, 150\)"
    ):
        spectrum_io.load_spectrum(tmp_path / "shape.npz")


# --------------------------------------------------------------------------- measures


def test_attribution_measures_follow_their_formulas():
    rng = np.random.default_rng(0)
    c, n = 4, 9
    act_pass, act_fail = rng.normal(size=(c, n)), rng.normal(size=(c, n))
    gxa_pass, gxa_fail = rng.normal(size=(c, n)), rng.normal(size=(c, n))
    fixes, breaks = rng.integers(0, 5, (c, n)), rng.integers(0, 5, (c, n))
    n_pass = np.array([[10], [0], [3], [7]])
    n_fail = np.array([[2], [4], [0], [0]])
    args = (act_pass, act_fail, gxa_pass, gxa_fail, fixes, breaks, n_pass, n_fail)
    for i in range(c):
        for j in range(n):
            total = n_pass[i, 0] + n_fail[i, 0]
            want_g = (gxa_pass[i, j] + gxa_fail[i, j]) / total if total else 0.0
            mean_f = act_fail[i, j] / n_fail[i, 0] if n_fail[i, 0] else 0.0
            mean_p = act_pass[i, j] / n_pass[i, 0] if n_pass[i, 0] else 0.0
            got = [
                float(measures.get_measure(m)(attribution.AttributionSums(*args))[i, j])
                for m in ("gradxact", "actdiff", "linear_ablation")
            ]
            np.testing.assert_allclose(got, [want_g, mean_f - mean_p, fixes[i, j] - breaks[i, j]],
                                       rtol=1e-5, atol=1e-6)  # fmt: skip
    assert measures.measure_names(family="attribution") == (
        "gradxact",
        "actdiff",
        "linear_ablation",
    )
    assert set(measures.measure_names(family="counts")) | {
        "gradxact",
        "actdiff",
        "linear_ablation",
    } == set(measures.measure_names())
    assert (
        measures.measure_kind("Linear-Ablation") == "attribution"
        and measures.measure_kind("ochiai") == "counts"
    )
    for name in measures.measure_names(family="attribution"):
        assert "Edge cases:" in measures.get_measure(name).__doc__, name
    with pytest.raises(ValueError, match="family must be"):
        measures.measure_names(family="floats")


def test_scores_dispatch_and_refuse_a_count_only_spectrum(trained_mlp, digits):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    s = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, attribution=True)
    pooled = np.asarray(localize.suspiciousness(s, "gradxact", pooled=True))
    per_class = np.asarray(localize.suspiciousness(s, "gradxact"))
    assert pooled.shape == (150,) and per_class.shape == (10, 150)
    a = s.attribution
    total = float(s.n_pass.sum() + s.n_fail.sum())
    np.testing.assert_allclose(
        pooled, (np.asarray(a.gxa_pass + a.gxa_fail).sum(0)) / total, rtol=1e-5
    )
    lin = np.asarray(localize.suspiciousness(s, "linear_ablation", pooled=True))
    np.testing.assert_array_equal(lin, np.asarray(a.fixes).sum(0) - np.asarray(a.breaks).sum(0))
    top = localize.suspicious_neurons(s, "gradxact", 5, pooled=True, layers=["dense_2"])
    assert all(100 <= i < 150 for i in top)
    plain = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test)
    with pytest.raises(ValueError, match="compute the spectrum with attribution=True"):
        localize.suspiciousness(plain, "actdiff")


# --------------------------------------------------------------------------- exact ablation


def test_exact_ablation_equals_rerunning_with_the_neuron_zeroed(trained_lenet, digits):
    model, params = trained_lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test[:120], digits.y_test[:120]
    ab = ablation.exact_ablation(prb, params, x, y, batch_size=50, chunk=3)
    assert ab.fixes.shape == (10, 16) and ab.n_inputs.sum() == 120
    base = zoo.predict(model, params, x)
    base_loss = _loss(model, params, x, y)
    for layer, size in zip(prb.index.layer_names, prb.index.layer_sizes, strict=True):
        for unit in range(size):
            zeroed = jax.tree.map(np.array, params)
            zeroed[layer]["kernel"][..., unit] = 0.0
            zeroed[layer]["bias"][unit] = 0.0
            pred = zoo.predict(model, zeroed, x)
            nid = prb.index.neuron_id(layer, unit)
            fixes = np.bincount(y[(pred == y) & (base != y)], minlength=10)
            breaks = np.bincount(y[(pred != y) & (base == y)], minlength=10)
            np.testing.assert_array_equal(ab.fixes[:, nid], fixes)
            np.testing.assert_array_equal(ab.breaks[:, nid], breaks)
            drop = np.zeros(10)
            np.add.at(drop, y, base_loss - _loss(model, zeroed, x, y))
            np.testing.assert_allclose(ab.loss_drop[:, nid], drop, rtol=1e-4, atol=1e-4)
    assert (ab.fixes + ab.breaks).sum() > 0
    score = ablation.ablation_scores(ab)
    np.testing.assert_array_equal(score, (ab.fixes - ab.breaks).sum(0))
    some = ablation.exact_ablation(prb, params, x, y, neurons=[3, 12])
    np.testing.assert_array_equal(some.fixes[:, [3, 12]], ab.fixes[:, [3, 12]])
    assert some.fixes[:, [0, 1, 2]].sum() == 0 and some.breaks[:, [0, 1, 2]].sum() == 0


def _loss(model, params, x, y):
    logits = model.apply(params, jnp.asarray(x))
    return -np.asarray(jax.nn.log_softmax(logits))[np.arange(len(y)), y].astype(np.float64)


def test_exact_ablation_errors(trained_mlp, digits):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    with pytest.raises(ValueError, match=r"neurons must be ids in \[0, 150\)"):
        ablation.exact_ablation(prb, params, digits.x_test[:5], digits.y_test[:5], neurons=[150])
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        ablation.exact_ablation(prb, params, digits.x_test[:5], digits.y_test[:5], chunk=0)
    with pytest.raises(ValueError, match=r"x must be \[n >= 1, 8, 8, 1\]"):
        ablation.exact_ablation(prb, params, digits.x_test[:5, :4], digits.y_test[:5])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\); got range \[0, 10\]"):
        ablation.exact_ablation(prb, params, digits.x_test[:3], np.array([0, 10, 2]))
    with pytest.raises(TypeError, match="labels must be integers; got dtype float64"):
        ablation.exact_ablation(prb, params, digits.x_test[:3], np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="by must be one of"):
        ablation.ablation_scores(ablation.exact_ablation(prb, params, digits.x_test[:5],
                                                         digits.y_test[:5]), by="rank")  # fmt: skip


# --------------------------------------------------------------------------- command line and run


def test_cli_spectrum_with_attribution_and_localize_by_attribution(capsys, tmp_path, monkeypatch):
    from test_cli import assert_usage_error, run_cli

    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "s.npz"
    code, stdout, err = run_cli(capsys, "spectrum", "--out", str(out), "--attribution",
                                "--no-progress", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout)["attribution"] == "margin"
    s = spectrum_io.load_spectrum(out)
    assert s.attribution is not None and s.attribution.linearised == "margin"
    code, stdout, err = run_cli(capsys, "localize", "--spectrum", str(out), "--measure",
                                "gradxact", "--k", "4", "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    want = localize.top_k_neurons(localize.suspiciousness(s, "gradxact", pooled=True), 4)
    assert [r["id"] for r in result["neurons"]] == want.tolist()
    code, stdout, err = run_cli(capsys, "localize", "--spectrum", str(out), "--measure",
                                "linear_ablation", "--class", "3", "--k", "2", "--json")  # fmt: skip
    assert code == 0, err
    row = json.loads(stdout)["neurons"][0]
    a = s.attribution
    assert row["score"] == float(a.fixes[3, row["id"]] - a.breaks[3, row["id"]])
    plain = tmp_path / "plain.npz"
    assert run_cli(capsys, "spectrum", "--out", str(plain), "--no-progress")[0] == 0
    code, stdout, err = run_cli(
        capsys, "localize", "--spectrum", str(plain), "--measure", "actdiff"
    )
    assert_usage_error(code, stdout, err, "compute the spectrum with attribution=True",
                       "--attribution")  # fmt: skip
    code, stdout, err = run_cli(capsys, "spectrum", "--out", str(tmp_path / "x.npz"),
                                "--attribution", "exact")  # fmt: skip
    assert_usage_error(code, stdout, err, "--attribution", "exact")


def test_run_with_an_attribution_measure(tmp_path, monkeypatch):
    from deepfault_jax import pipeline

    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))
    config = pipeline.RunConfig(measures=("ochiai", "gradxact"), k=(2,), inputs_per_class=3,
                                random_repeats=1)  # fmt: skip
    result = pipeline.run(config, tmp_path / "run").to_json()
    rows = {r["measure"]: r for r in result["results"]}
    assert set(rows) == {"ochiai", "gradxact"}
    saved = spectrum_io.load_spectrum(tmp_path / "run" / "spectrum.npz")
    table = localize.suspicious_neurons(saved, "gradxact", 2)
    with np.load(tmp_path / "run" / "synthesized.npz") as f:
        np.testing.assert_array_equal(f["gradxact_k2__table"], table)
    assert 0.0 <= rows["gradxact"]["misclassification_rate"] <= 1.0
    assert "| gradxact |" in (tmp_path / "run" / "report.md").read_text()
