"""The spectrum engine against the paper's definition, and its exactness guarantees."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FORCED_DEVICES, assert_identical, needs_fashion
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import spectrum_loops

from deepfault_jax import data, metrics, probe, spectrum, spectrum_io, streaming, training, zoo
from deepfault_jax.spectrum import Spectrum


def assert_matches_reference(s: Spectrum, logits, acts, labels, threshold=0.0):
    want = spectrum_loops(logits, acts, labels, num_classes=s.num_classes, threshold=threshold)
    got_arrays = [np.asarray(a) for a in (s.a_pass, s.a_fail, s.n_pass, s.n_fail)]
    for got, ref in zip(got_arrays, want, strict=True):
        np.testing.assert_array_equal(got, ref)


@pytest.fixture(scope="module")
def lenet(digits):
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(0), model)
    return model, params


@pytest.fixture(scope="module")
def trained_mlp(digits):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    return model, training.train(jax.random.key(0), model, digits, epochs=3).params


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("conv_reduce", ["mean", "max", "none"])
@pytest.mark.parametrize("name", ["mlp-5x30", "lenet1", "lenet5"])
def test_equals_reference_loops_on_random_models_and_data(name, conv_reduce):
    rng = np.random.default_rng(3)
    model = zoo.create_model(name, input_shape=(8, 8, 1), num_classes=5)
    params = zoo.init_params(jax.random.key(11), model)
    prb = probe.model_probe(model, params, conv_reduce=conv_reduce)
    x = rng.random((67, 8, 8, 1), dtype=np.float32)
    logits, acts = prb.flat(params, x)
    preds = np.asarray(jnp.argmax(logits, -1))
    # class 0 has no failure: its inputs are exactly those predicted 0
    y = np.where(preds == 0, 0, rng.integers(1, 5, size=67)).astype(np.int32)
    s = streaming.compute_spectrum(prb, params, x, y, batch_size=16)
    assert_matches_reference(s, logits, acts, y)
    assert int(s.n_fail[0]) == 0 and int(s.n_pass[0]) == int((preds == 0).sum())
    assert int(s.n_fail.sum()) > 0 and int(s.a_fail.sum()) > 0


def test_all_correct_and_all_wrong_batches(trained_mlp, digits):
    model, params = trained_mlp
    prb = probe.model_probe(model, params)
    x = digits.x_test[:50]
    logits, acts = prb.flat(params, x)
    preds = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    right = streaming.compute_spectrum(prb, params, x, preds, batch_size=25)
    assert int(right.n_fail.sum()) == 0 and int(right.a_fail.sum()) == 0
    assert_matches_reference(right, logits, acts, preds)
    wrong = streaming.compute_spectrum(prb, params, x, (preds + 1) % 10, batch_size=25)
    assert int(wrong.n_pass.sum()) == 0 and int(wrong.a_pass.sum()) == 0
    assert_matches_reference(wrong, logits, acts, (preds + 1) % 10)


@pytest.mark.parametrize("threshold", [0.0, 0.5, -0.5])
def test_values_equal_to_threshold_are_inactive(threshold):
    def fn(params, x):
        flat = x.reshape(x.shape[0], -1)
        # quantised to steps of 0.5: many values equal the threshold exactly
        return flat[:, :4] @ params, {"q": jnp.round(flat * 4 - 2) / 2}

    params = jnp.eye(4)
    prb = probe.function_probe(fn, params, input_shape=(3, 3, 1))
    rng = np.random.default_rng(0)
    x = rng.random((40, 3, 3, 1), dtype=np.float32)
    y = rng.integers(0, 4, 40).astype(np.int32)
    logits, acts = prb.flat(params, x)
    assert int(np.sum(np.asarray(acts) == threshold)) > 20
    s = streaming.compute_spectrum(prb, params, x, y, batch_size=9, threshold=threshold)
    assert s.threshold == threshold
    assert_matches_reference(s, logits, acts, y, threshold=threshold)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 40),
    neurons=st.integers(1, 12),
    classes=st.integers(2, 6),
)
def test_update_invariants_and_reference(data, n, neurons, classes):
    values = st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0])
    acts = data.draw(hnp.arrays(np.float32, (n, neurons), elements=values))
    logits = data.draw(hnp.arrays(np.float32, (n, classes), elements=values))
    labels = data.draw(hnp.arrays(np.int32, (n,), elements=st.integers(0, classes - 1)))
    mask = data.draw(hnp.arrays(np.bool_, (n,)))
    threshold = data.draw(st.sampled_from([0.0, 0.25, -0.5]))
    index = probe.NeuronIndex(("layer",), (neurons,))
    s0 = spectrum.init_spectrum(index, num_classes=classes, threshold=threshold)
    s = jax.jit(spectrum.update_spectrum)(s0, logits, acts, labels, mask=mask)
    a_s, a_f, n_s, n_f = (np.asarray(a) for a in s.counts())
    np.testing.assert_array_equal(
        a_s + n_s, np.broadcast_to(np.asarray(s.n_pass)[:, None], a_s.shape)
    )
    np.testing.assert_array_equal(
        a_f + n_f, np.broadcast_to(np.asarray(s.n_fail)[:, None], a_f.shape)
    )
    assert min(a.min() for a in (a_s, a_f, n_s, n_f)) >= 0
    assert int(s.n_pass.sum() + s.n_fail.sum()) == int(mask.sum())
    assert_matches_reference(s, logits[mask], acts[mask], labels[mask], threshold=threshold)
    pooled = s.pooled()
    np.testing.assert_array_equal(pooled.a_s, a_s.sum(0))
    np.testing.assert_array_equal(pooled.n_f, n_f.sum(0))
    np.testing.assert_array_equal(s.for_class(classes - 1).a_f, a_f[classes - 1])


# --------------------------------------------------------------------------- bit-identity


def test_batch_sizes_give_identical_spectra(lenet, digits):
    model, params = lenet
    prb = probe.model_probe(model, params)
    runs = [
        streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=b)
        for b in (1, 7, 128, 1000)
    ]
    for other in runs[1:]:
        assert_identical(runs[0], other)
    logits, acts = prb.flat(params, digits.x_test)
    assert_matches_reference(runs[0], logits, acts, digits.y_test)


@pytest.mark.skipif(jax.local_device_count() < FORCED_DEVICES, reason="needs 8 forced CPU devices")
@pytest.mark.parametrize("devices", [1, 2, 8])
def test_device_counts_give_identical_spectra(lenet, digits, devices):
    model, params = lenet
    prb = probe.model_probe(model, params)
    single = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=64)
    mesh = streaming.data_mesh(devices=devices)
    sharded = streaming.compute_spectrum(
        prb, params, digits.x_test, digits.y_test, batch_size=64, mesh=mesh
    )
    assert_identical(single, sharded)


def run_two_processes(out: Path, *extra: str) -> Spectrum:
    """The spectrum of ``multiprocess_worker.py`` run as 2 processes over 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = Path(__file__).with_name("multiprocess_worker.py")
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(pid), "2", str(port), str(out), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    return spectrum_io.load_spectrum(out)


def test_two_processes_over_loopback_equal_one(tmp_path, digits):
    two = run_two_processes(tmp_path / "two.npz")
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(7), model)
    one = streaming.compute_spectrum(
        probe.model_probe(model, params), params, digits.x_test, digits.y_test, batch_size=32
    )
    assert_identical(one, two)


def test_interrupted_and_resumed_run_is_identical(lenet, digits, tmp_path):
    model, params = lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    whole = streaming.compute_spectrum(prb, params, x, y, batch_size=20)
    path = tmp_path / "progress.npz"

    class Interrupted(Exception):
        pass

    def stop_after_7(done, _):
        if done == 7:
            raise Interrupted

    with pytest.raises(Interrupted):
        streaming.compute_spectrum(
            prb, params, x, y, batch_size=20, checkpoint_path=path, checkpoint_every=3,
            callback=stop_after_7,
        )  # fmt: skip
    saved, meta = spectrum_io.load_spectrum(path, with_metadata=True)
    assert meta["position"] == 120 and meta["complete"] is False
    assert saved.num_inputs == 120
    # resumed with another batch size: counts are order-free
    resumed = streaming.compute_spectrum(
        prb, params, x, y, batch_size=33, checkpoint_path=path, checkpoint_every=3
    )
    assert_identical(whole, resumed)
    assert spectrum_io.load_spectrum(path, with_metadata=True)[1]["complete"] is True
    # a finished checkpoint is not counted twice
    assert_identical(whole, streaming.compute_spectrum(prb, params, x, y, checkpoint_path=path))
    with pytest.raises(ValueError, match="computed on other data"):
        streaming.compute_spectrum(prb, params, x[:-1], y[:-1], checkpoint_path=path)
    other = probe.model_probe(model, params, layers=["conv_0"])
    with pytest.raises(ValueError, match="cannot resume spectra of different layouts"):
        streaming.compute_spectrum(other, params, x, y, checkpoint_path=path)


def test_linen_nnx_and_function_probes_of_the_same_weights(digits):
    linen = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(4), linen)
    nnx_model = zoo.create_model("nnx-mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    state = zoo.init_params(jax.random.key(0), nnx_model)
    for layer in ("dense_0", "dense_1", "dense_2", "logits"):
        state[layer]["kernel"].set_value(params[layer]["kernel"])
        state[layer]["bias"].set_value(params[layer]["bias"])

    def by_hand(p, x):
        h = x.reshape(x.shape[0], -1)
        acts = {}
        for i in range(3):
            acts[f"dense_{i}"] = h @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"]
            h = jax.nn.relu(acts[f"dense_{i}"])
        return h @ p["logits"]["kernel"] + p["logits"]["bias"], acts

    fn_probe = probe.function_probe(by_hand, params, input_shape=digits.input_shape)
    x, y = digits.x_test, digits.y_test
    a = streaming.compute_spectrum(probe.model_probe(linen, params), params, x, y)
    b = streaming.compute_spectrum(probe.model_probe(nnx_model, state), state, x, y)
    c = streaming.compute_spectrum(fn_probe, params, x, y)
    assert_identical(a, b)
    assert_identical(a, c)


def test_no_recompilation_between_batches(digits):
    traces = []

    def fn(params, x):
        traces.append(x.shape)
        h = x.reshape(x.shape[0], -1) @ params
        return h[:, :10], {"h": h}

    params = jax.random.normal(jax.random.key(0), (64, 20))
    prb = probe.function_probe(fn, params, input_shape=(8, 8, 1))
    before = len(traces)
    # 449 rows in batches of 100: four full batches and a padded tail
    streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=100)
    assert len(traces) - before == 1
    streaming.compute_spectrum(
        prb, params, digits.x_test[:250], digits.y_test[:250], batch_size=100
    )
    assert len(traces) - before == 1  # a second run of the same shape reuses the compilation


# --------------------------------------------------------------------------- merge, files, metric


def test_merge_of_disjoint_parts_equals_the_whole(lenet, digits):
    model, params = lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    whole = streaming.compute_spectrum(prb, params, x, y)
    parts = [
        streaming.compute_spectrum(prb, params, x[s], y[s])
        for s in (slice(0, 200), slice(200, None))
    ]
    assert_identical(whole, spectrum.merge_spectra(*parts))
    other = streaming.compute_spectrum(
        probe.model_probe(model, params, layers=["conv_1"]), params, x, y
    )
    with pytest.raises(ValueError, match="cannot merge spectra of different layouts"):
        spectrum.merge_spectra(whole, other)
    shifted = streaming.compute_spectrum(prb, params, x, y, threshold=0.1)
    with pytest.raises(ValueError, match="expected threshold 0.0, got 0.1"):
        spectrum.merge_spectra(whole, shifted)


def test_save_and_load_round_trip(lenet, digits, tmp_path):
    model, params = lenet
    s = streaming.compute_spectrum(
        probe.model_probe(model, params), params, digits.x_test, digits.y_test
    )
    path = spectrum_io.save_spectrum(tmp_path / "s.npz", s, metadata={"model": "lenet1"})
    with np.load(path, allow_pickle=False) as f:
        for key in (
            "a_pass",
            "a_fail",
            "n_pass",
            "n_fail",
            "layer_names",
            "layer_sizes",
            "threshold",
        ):
            assert key in f.files
        assert list(f["layer_names"]) == ["conv_0", "conv_1"]
        np.testing.assert_array_equal(f["layer_sizes"], [4, 12])
    loaded, meta = spectrum_io.load_spectrum(path, with_metadata=True)
    assert_identical(s, loaded)
    assert meta == {"model": "lenet1"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_corrupt_spectrum_files(lenet, digits, tmp_path):
    model, params = lenet
    s = streaming.compute_spectrum(
        probe.model_probe(model, params), params, digits.x_test, digits.y_test
    )
    path = spectrum_io.save_spectrum(tmp_path / "s.npz", s)
    raw = path.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a readable spectrum file"):
        spectrum_io.load_spectrum(bad)
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable spectrum file"):
        spectrum_io.load_spectrum(bad)
    with pytest.raises(ValueError, match="not a file"):
        spectrum_io.load_spectrum(tmp_path / "absent.npz")
    arrays = dict(np.load(path, allow_pickle=False))
    np.savez(bad, **{k: v for k, v in arrays.items() if k != "a_fail"})
    with pytest.raises(ValueError, match=r"missing \['a_fail'\]"):
        spectrum_io.load_spectrum(bad)
    np.savez(bad, **{**arrays, "a_pass": arrays["a_pass"][:, :3]})
    with pytest.raises(
        ValueError, match=r"a_pass must be integer of shape \(10, 16\); got int32 \(10, 3\)"
    ):
        spectrum_io.load_spectrum(bad)
    np.savez(bad, **{**arrays, "a_pass": arrays["a_pass"] + 1000})
    with pytest.raises(ValueError, match="must not exceed the input counts"):
        spectrum_io.load_spectrum(bad)
    np.savez(bad, **{**arrays, "format": np.str_("something-else")})
    with pytest.raises(ValueError, match="format must be 'deepfault-jax-spectrum'"):
        spectrum_io.load_spectrum(bad)
    assert zipfile.is_zipfile(path)  # the original is untouched


def test_spectrum_metric_in_an_nnx_eval_step(digits):
    model = zoo.create_model("nnx-mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    state = zoo.init_params(jax.random.key(0), model)
    prb = probe.model_probe(model, state)
    metric = metrics.SpectrumMetric(prb.index, num_classes=10)

    @nnx.jit
    def eval_step(metric, state, x, y, mask):
        logits, acts = prb(state, x)
        metric.update(logits=logits, activations=acts, labels=y, mask=mask)

    for _ in range(2):  # reset between epochs
        metric.reset()
        for batch in data.iterate_batches(digits.x_test, digits.y_test, batch_size=64):
            eval_step(metric, state, batch.x, batch.y, batch.mask)
        assert_identical(
            metric.compute(),
            streaming.compute_spectrum(prb, state, digits.x_test, digits.y_test),
        )


# --------------------------------------------------------------------------- bad input


def test_bad_batches_are_refused(lenet, digits):
    model, params = lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test[:20].copy(), digits.y_test[:20].copy()
    y[3] = 10
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\); got range \[0, 10\]"):
        streaming.compute_spectrum(prb, params, x, y)
    y[3] = -1
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\); got range \[-1, 9\]"):
        streaming.compute_spectrum(prb, params, x, y)
    y = digits.y_test[:20]
    x[0, 0, 0, 0] = np.nan
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(
        ValueError, match="must give finite logits and activations; got [1-9][0-9]* NaN or infinite"
    ):
        streaming.compute_spectrum(prb, params, x, y)
    path = Path(tempfile.mkdtemp()) / "progress.npz"
    with pytest.raises(ValueError, match="must give finite logits and activations"):
        streaming.compute_spectrum(prb, params, x, y, batch_size=4, checkpoint_path=path)
    assert not path.exists()  # the bad rows sit in the first batch: nothing was saved
    with pytest.raises(
        ValueError, match=r"x must have shape \[n, 8, 8, 1\]; got \[20, 28, 28, 1\]"
    ):
        streaming.compute_spectrum(prb, params, np.zeros((20, 28, 28, 1), np.float32), y)
    with pytest.raises(TypeError, match="labels must be integers"):
        streaming.compute_spectrum(prb, params, digits.x_test[:20], y.astype(np.float32))


def test_counts_refuse_to_overflow(lenet, digits):
    model, params = lenet
    prb = probe.model_probe(model, params)
    nearly_full = spectrum.init_spectrum(prb.index, num_classes=10)
    nearly_full = nearly_full.replace(n_pass=nearly_full.n_pass.at[0].set(2**31 - 10))
    batches = data.iterate_batches(digits.x_test, digits.y_test, batch_size=16)
    with pytest.raises(ValueError, match="counts would pass the int32 limit 2147483647"):
        streaming.accumulate_spectrum(prb, params, batches, spectrum=nearly_full)


def test_accumulate_checks_the_layout_it_continues(lenet, digits):
    model, params = lenet
    prb = probe.model_probe(model, params)
    other = spectrum.init_spectrum(probe.NeuronIndex(("x",), (3,)), num_classes=10)
    batches = data.iterate_batches(digits.x_test, digits.y_test, batch_size=16)
    with pytest.raises(ValueError, match="cannot continue spectra of different layouts"):
        streaming.accumulate_spectrum(prb, params, batches, spectrum=other)


def test_accumulate_checks_each_batch_shape(lenet):
    model, params = lenet
    prb = probe.model_probe(model, params)
    batch = data.Batch(
        np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int32), np.ones(4, bool)
    )
    with pytest.raises(
        ValueError, match=r"inputs must have shape \[batch, 8, 8, 1\]; got \[4, 28, 28, 1\]"
    ):
        streaming.accumulate_spectrum(prb, params, [batch])


def test_training_example_logs_the_spectrum_each_epoch():
    script = Path(__file__).resolve().parents[1] / "examples" / "train_with_spectrum.py"
    done = subprocess.run(
        [sys.executable, str(script), "--epochs", "2"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "active share fail/pass: dense_0" in lines[0]


@pytest.mark.parametrize("name", ["lenet1", "lenet5"])
def test_fast_single_channel_conv_gives_the_same_spectrum(digits, name):
    """The probe's rewrite of the first (one input channel) conv is exact where it counts."""
    model = zoo.create_model(name, input_shape=digits.input_shape, num_classes=10)
    params = training.train(jax.random.key(0), model, digits, epochs=2).params
    fast = probe.model_probe(model, params)
    plain = probe.model_probe(model, params, fast_conv=False)
    x = np.concatenate([digits.x_test, digits.x_train])
    y = np.concatenate([digits.y_test, digits.y_train])
    _, a = fast.flat(params, x)
    _, b = plain.flat(params, x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert_identical(
        streaming.compute_spectrum(fast, params, x, y),
        streaming.compute_spectrum(plain, params, x, y),
    )


@needs_fashion
def test_fast_conv_spectrum_equals_plain_on_fashion_mnist():
    ds = data.load_dataset("fashion-mnist")
    model = zoo.create_model("lenet5", input_shape=ds.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(3), model)
    fast = probe.model_probe(model, params)
    plain = probe.model_probe(model, params, fast_conv=False)
    assert_identical(
        streaming.compute_spectrum(fast, params, ds.x_test, ds.y_test),
        streaming.compute_spectrum(plain, params, ds.x_test, ds.y_test),
    )
