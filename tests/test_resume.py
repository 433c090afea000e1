"""Resume files, spectrum files from elsewhere, and the options of a spectrum run, on real models.

Each test reproduces a defect seen before: a resume that mixed two runs, a
crafted resume file taken at its word, counts that wrapped when loaded, numpy's
"allow_pickle" hint for a file that is not a spectrum, a NaN threshold that
counted nothing, and a batch far larger than the data.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import FORCED_DEVICES, assert_identical

from deepfault_jax import data, kernels, metrics, probe, spectrum, spectrum_io, streaming, zoo
from deepfault_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lenet(digits):
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    return model, zoo.init_params(jax.random.key(0), model)


class Interrupted(Exception):
    pass


def interrupted_run(prb, params, x, y, path, *, stop_at=7, batch_size=20, every=3, **kw):
    """A run that saves every ``every`` batches and stops after ``stop_at``."""

    def stop(done, _):
        if done == stop_at:
            raise Interrupted

    with pytest.raises(Interrupted):
        streaming.compute_spectrum(prb, params, x, y, batch_size=batch_size, checkpoint_path=path,
                                   checkpoint_every=every, callback=stop, **kw)  # fmt: skip
    return spectrum_io.load_spectrum(path, with_metadata=True)


@pytest.fixture()
def partial(lenet, digits, tmp_path):
    """A resume file of lenet1 (conv_reduce mean, pre-activation) at position 120 of 449."""
    model, params = lenet
    path = tmp_path / "run.partial.npz"
    saved, meta = interrupted_run(
        probe.model_probe(model, params), params, digits.x_test, digits.y_test, path
    )
    assert meta["position"] == 120 and saved.num_inputs == 120
    return path


def rewrite(path: Path, dest: Path, **arrays_or_meta) -> Path:
    """``path`` with some arrays replaced (``metadata=`` takes a JSON-able value)."""
    with np.load(path, allow_pickle=False) as f:
        arrays = dict(f)
    for key, value in arrays_or_meta.items():
        arrays[key] = np.str_(json.dumps(value)) if key == "metadata" else value
    np.savez(dest, **arrays)
    return dest


def metadata_of(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return json.loads(str(f["metadata"]))


# --------------------------------------------------------------------------- 1: mixed runs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"conv_reduce": "max"}, "it was computed with conv_reduce 'mean', this run uses 'max'"),
        ({"values": "post"}, "it was computed with values 'pre', this run uses 'post'"),
    ],
)
def test_resume_refuses_another_probe(lenet, digits, partial, options, message):
    model, params = lenet
    other = probe.model_probe(model, params, **options)
    assert other.index == probe.model_probe(model, params).index  # the same layout
    with pytest.raises(InputError, match=f"cannot resume from {partial}: {message}"):
        streaming.compute_spectrum(other, params, digits.x_test, digits.y_test,
                                   checkpoint_path=partial)  # fmt: skip
    assert metadata_of(partial)["position"] == 120  # left as it was


def test_resume_refuses_other_parameters(lenet, digits, partial):
    model, _ = lenet
    params = zoo.init_params(jax.random.key(1), model)  # another seed
    with pytest.raises(
        InputError,
        match=r"cannot resume from .*: it was computed with other parameters "
        r"\(digest [0-9a-f]{32} vs [0-9a-f]{32}\)",
    ):
        streaming.compute_spectrum(probe.model_probe(model, params), params, digits.x_test,
                                   digits.y_test, checkpoint_path=partial)  # fmt: skip


def test_resume_refuses_one_changed_weight(lenet, digits, partial):
    model, params = lenet
    nudged = jax.tree.map(lambda a: a, params)
    nudged["conv_1"]["bias"] = params["conv_1"]["bias"].at[3].add(1e-6)
    with pytest.raises(InputError, match="computed with other parameters"):
        streaming.compute_spectrum(probe.model_probe(model, nudged), nudged, digits.x_test,
                                   digits.y_test, checkpoint_path=partial)  # fmt: skip


def test_resume_file_stores_each_part_and_resumes_with_another_batch_size(lenet, digits, partial):
    model, params = lenet
    prb = probe.model_probe(model, params)
    meta = metadata_of(partial)
    assert meta["conv_reduce"] == "mean" and meta["values"] == "pre"
    assert meta["threshold"] == 0.0 and meta["attribution"] is None
    assert meta["layers"] == [["conv_0", 4], ["conv_1", 12]]
    assert meta["input_shape"] == [8, 8, 1] and meta["num_classes"] == 10
    assert len(meta["params_digest"]) == 32 and len(meta["data_fingerprint"]) == 32
    whole = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=20)
    resumed = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test,
                                         batch_size=37, checkpoint_path=partial)  # fmt: skip
    assert_identical(whole, resumed)
    assert metadata_of(partial)["complete"] is True


def test_nnx_parameters_are_fingerprinted(digits, tmp_path):
    model = zoo.create_model("nnx-mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    state = zoo.init_params(jax.random.key(0), model)
    x, y = digits.x_test, digits.y_test
    path = tmp_path / "nnx.partial.npz"
    interrupted_run(probe.model_probe(model, state), state, x, y, path)
    other = zoo.init_params(jax.random.key(5), model)
    with pytest.raises(InputError, match="computed with other parameters"):
        streaming.compute_spectrum(probe.model_probe(model, other), other, x, y,
                                   checkpoint_path=path)  # fmt: skip
    whole = streaming.compute_spectrum(probe.model_probe(model, state), state, x, y)
    resumed = streaming.compute_spectrum(probe.model_probe(model, state), state, x, y,
                                         checkpoint_path=path)  # fmt: skip
    assert_identical(whole, resumed)


# --------------------------------------------------------------------------- 2: crafted partials


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"position": -20}, r"position must lie in \[0, 449\]; got -20"),
        ({"position": 10**9}, r"position must lie in \[0, 449\]; got 1000000000"),
        ({"position": "120"}, "position must be an integer; got str '120'"),
        ({"position": 120.5}, "position must be an integer; got 120.5"),
        ({"position": True}, "position must be an integer; got bool True"),
        ({"position": 60}, "its counts cover 120 inputs, its position says 60"),
        ({"position": 449}, "its counts cover 120 inputs, its position says 449"),
        ({"complete": True}, "complete is True at position 120 of 449"),
        ({"complete": "no"}, "complete must be true or false; got str 'no'"),
    ],
)
def test_crafted_partial_positions_are_refused(lenet, digits, partial, tmp_path, change, message):
    model, params = lenet
    crafted = rewrite(
        partial, tmp_path / "crafted.npz", metadata={**metadata_of(partial), **change}
    )
    with pytest.raises(InputError, match=f"cannot resume from {crafted}: .*{message}"):
        streaming.compute_spectrum(probe.model_probe(model, params), params, digits.x_test,
                                   digits.y_test, checkpoint_path=crafted)  # fmt: skip


def test_crafted_partial_metadata_is_refused(lenet, digits, partial, tmp_path):
    model, params = lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    listed = rewrite(partial, tmp_path / "list.npz", metadata=[120, False])
    with pytest.raises(InputError, match="metadata must be a JSON object; got a list"):
        streaming.compute_spectrum(prb, params, x, y, checkpoint_path=listed)
    with pytest.raises(InputError, match="metadata must be a JSON object; got a list"):
        spectrum_io.load_spectrum(listed)
    meta = metadata_of(partial)
    for key in ("position", "params_digest", "conv_reduce"):
        lacking = rewrite(partial, tmp_path / f"no-{key}.npz",
                          metadata={k: v for k, v in meta.items() if k != key})  # fmt: skip
        with pytest.raises(InputError, match=f"its metadata lacks \\['{key}'\\]"):
            streaming.compute_spectrum(prb, params, x, y, checkpoint_path=lacking)
    # a finished spectrum (no resume metadata) given as the resume file
    plain = spectrum_io.save_spectrum(
        tmp_path / "plain.npz", streaming.compute_spectrum(prb, params, x, y), metadata={"a": 1}
    )
    with pytest.raises(InputError, match="not a resume file"):
        streaming.compute_spectrum(prb, params, x, y, checkpoint_path=plain)


def test_partial_counts_must_match_the_position(lenet, digits, partial, tmp_path):
    model, params = lenet
    with np.load(partial, allow_pickle=False) as f:
        n_fail = f["n_fail"].copy()
    n_fail[3] += 1  # one input more than the position says
    crafted = rewrite(partial, tmp_path / "long.npz", n_fail=n_fail)
    with pytest.raises(InputError, match="its counts cover 121 inputs, its position says 120"):
        streaming.compute_spectrum(probe.model_probe(model, params), params, digits.x_test,
                                   digits.y_test, checkpoint_path=crafted)  # fmt: skip


# --------------------------------------------------------------------------- 3: counts and sums


@pytest.fixture()
def spectrum_file(lenet, digits, tmp_path):
    model, params = lenet
    s = streaming.compute_spectrum(
        probe.model_probe(model, params), params, digits.x_test, digits.y_test
    )
    return spectrum_io.save_spectrum(tmp_path / "s.npz", s)


def test_counts_beyond_int32_are_refused_not_wrapped(spectrum_file, tmp_path):
    with np.load(spectrum_file, allow_pickle=False) as f:
        n_pass = f["n_pass"].astype(np.int64)
    n_pass[2] = 2**31 + 5
    crafted = rewrite(spectrum_file, tmp_path / "big.npz", n_pass=n_pass)
    with pytest.raises(
        InputError, match=r"n_pass must hold counts of at most 2147483647 \(int32\); got 2147483653"
    ):
        spectrum_io.load_spectrum(crafted)
    n_pass[2] = 2**31 - 1  # the largest int32 still loads
    s = spectrum_io.load_spectrum(rewrite(spectrum_file, tmp_path / "edge.npz", n_pass=n_pass))
    assert int(s.n_pass[2]) == 2**31 - 1 and s.n_pass.dtype == np.int32


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64, np.float64, np.bool_])
def test_counts_must_be_signed_integers(spectrum_file, tmp_path, dtype):
    with np.load(spectrum_file, allow_pickle=False) as f:
        a_fail = f["a_fail"].astype(dtype)
    crafted = rewrite(spectrum_file, tmp_path / "kind.npz", a_fail=a_fail)
    with pytest.raises(
        InputError, match=f"a_fail must be signed integers .*; got {np.dtype(dtype)}"
    ):
        spectrum_io.load_spectrum(crafted)


@pytest.fixture(scope="module")
def attribution_file(digits, tmp_path_factory):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(2), model)
    s = streaming.compute_spectrum(probe.model_probe(model, params), params, digits.x_test[:100],
                                   digits.y_test[:100], attribution=True)  # fmt: skip
    return spectrum_io.save_spectrum(tmp_path_factory.mktemp("attr") / "a.npz", s)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "attribution_gxa_fail",
            np.nan,
            "attribution_gxa_fail must be finite; got 1 NaN or infinite",
        ),
        (
            "attribution_act_pass",
            np.inf,
            "attribution_act_pass must be finite; got 1 NaN or infinite",
        ),
        ("attribution_act_fail", 1e300, "attribution_act_fail must be finite in float32"),
    ],
)
def test_attribution_sums_must_be_finite(attribution_file, tmp_path, field, value, message):
    with np.load(attribution_file, allow_pickle=False) as f:
        a = f[field].astype(np.float64)
    a[1, 7] = value
    with pytest.raises(InputError, match=message):
        spectrum_io.load_spectrum(rewrite(attribution_file, tmp_path / "bad.npz", **{field: a}))


def test_attribution_counts_must_be_signed_and_in_range(attribution_file, tmp_path):
    with np.load(attribution_file, allow_pickle=False) as f:
        fixes = f["attribution_fixes"]
    with pytest.raises(InputError, match="attribution_fixes must be signed integers"):
        spectrum_io.load_spectrum(rewrite(attribution_file, tmp_path / "u.npz",
                                          attribution_fixes=fixes.astype(np.uint32)))  # fmt: skip
    big = fixes.astype(np.int64)
    big[0, 0] = 2**32
    with pytest.raises(InputError, match="attribution_fixes must hold counts of at most"):
        spectrum_io.load_spectrum(rewrite(attribution_file, tmp_path / "b.npz",
                                          attribution_fixes=big))  # fmt: skip


def test_threshold_in_a_file_must_be_finite(spectrum_file, tmp_path):
    crafted = rewrite(spectrum_file, tmp_path / "t.npz", threshold=np.float64(np.nan))
    with pytest.raises(InputError, match="threshold must be a finite number; got nan"):
        spectrum_io.load_spectrum(crafted)


# --------------------------------------------------------------------------- 4: not a spectrum


EXPECTED = r"is not a readable spectrum file: expected an \.npz written by save_spectrum \(deepfault-jax spectrum --out \.\.\.\); got "


class _Touch:
    """Unpickling this creates a file: a probe that nothing is ever unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_files_that_are_not_spectra_are_named(tmp_path):
    marker = tmp_path / "unpickled"
    text = tmp_path / "notes.npz"
    text.write_text("a_pass,a_fail\n1,2\n")
    npy = tmp_path / "a.npz"
    np.save(npy.with_suffix(".npy"), np.zeros((3, 3), np.int32))
    npy.write_bytes(npy.with_suffix(".npy").read_bytes())
    pickled = tmp_path / "p.npz"
    pickled.write_bytes(pickle.dumps(_Touch(marker)))
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    other_zip = tmp_path / "other.npz"
    np.savez(other_zip, weights=np.zeros(3))
    cases = [
        (text, "a text file"),
        (npy, r"a \.npy array"),
        (pickled, "a Python pickle, which is never loaded"),
        (empty, "an empty file"),
        (other_zip, r"a zip without the spectrum arrays \(missing \['a_pass'"),
    ]
    for path, got in cases:
        with pytest.raises(InputError, match=f"{path} {EXPECTED}{got}") as info:
            spectrum_io.load_spectrum(path)
        assert "allow_pickle" not in str(info.value) and "unsafe" not in str(info.value)
    assert not marker.exists()


def test_object_arrays_in_an_npz_are_never_unpickled(spectrum_file, tmp_path):
    marker = tmp_path / "unpickled"
    with np.load(spectrum_file, allow_pickle=False) as f:
        arrays = dict(f)
    arrays["layer_names"] = np.array([_Touch(marker), "conv_1"], dtype=object)
    crafted = tmp_path / "objects.npz"
    np.savez(crafted, **arrays)  # pickles the object array
    with pytest.raises(InputError, match="layer_names holds Python objects .*never loaded"):
        spectrum_io.load_spectrum(crafted)
    assert not marker.exists()
    assert zipfile.is_zipfile(crafted)


# --------------------------------------------------------------------------- 5: thresholds


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_thresholds_are_refused_everywhere(lenet, digits, bad):
    model, params = lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test[:40], digits.y_test[:40]
    match = f"threshold must be a finite number; got {bad}"
    with pytest.raises(InputError, match=match):
        spectrum.init_spectrum(prb.index, num_classes=10, threshold=bad)
    with pytest.raises(InputError, match=match):
        streaming.compute_spectrum(prb, params, x, y, threshold=bad)
    batches = data.iterate_batches(x, y, batch_size=8)
    with pytest.raises(InputError, match=match):
        streaming.accumulate_spectrum(prb, params, batches, threshold=bad)
    with pytest.raises(InputError, match=match):
        metrics.SpectrumMetric(prb.index, num_classes=10, threshold=bad)


def test_the_batch_kernel_refuses_a_non_finite_threshold(lenet, digits):
    model, params = lenet
    prb = probe.model_probe(model, params)
    logits, acts = prb(params, digits.x_test[:16])
    y, mask = digits.y_test[:16], np.ones(16, bool)
    with pytest.raises(InputError, match="threshold must be a finite number; got nan"):
        kernels.batch_counts(logits, list(acts.values()), y, mask, threshold=float("nan"))
    # a spectrum built around init_spectrum's check
    s = spectrum.init_spectrum(prb.index, num_classes=10).replace(threshold=float("nan"))
    with pytest.raises(InputError, match="threshold must be a finite number; got nan"):
        jax.jit(spectrum.update_spectrum)(s, logits, acts, y)


# --------------------------------------------------------------------------- 6: batch sizes


def _shape_probe(traces: list):
    """A cheap real model (a random linear map) that records the batch shapes it is traced with."""

    def fn(params, x):
        traces.append(x.shape[0])
        h = x.reshape(x.shape[0], -1) @ params
        return h[:, :10], {"h": h}

    params = jax.random.normal(jax.random.key(0), (64, 20))
    return probe.function_probe(fn, params, input_shape=(8, 8, 1)), params


def test_a_batch_is_never_larger_than_the_data(digits):
    traces: list = []
    prb, params = _shape_probe(traces)
    x, y = digits.x_test, digits.y_test
    exact = streaming.compute_spectrum(prb, params, x, y, batch_size=64)
    big = streaming.compute_spectrum(prb, params, x, y, batch_size=10**6)
    assert max(traces) == len(x)  # clamped to the 449 rows
    assert_identical(exact, big)


def test_a_huge_batch_size_does_not_allocate(lenet, digits):
    model, params = lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    assert_identical(
        streaming.compute_spectrum(prb, params, x, y),
        streaming.compute_spectrum(prb, params, x, y, batch_size=100_000_000),
    )


@pytest.mark.skipif(jax.local_device_count() < FORCED_DEVICES, reason="needs 8 forced CPU devices")
def test_a_clamped_batch_stays_a_multiple_of_the_devices(digits):
    traces: list = []
    prb, params = _shape_probe(traces)
    x, y = digits.x_test, digits.y_test
    mesh = streaming.data_mesh(devices=FORCED_DEVICES)
    one = streaming.compute_spectrum(prb, params, x, y, batch_size=64)
    traces.clear()
    sharded = streaming.compute_spectrum(prb, params, x, y, batch_size=10**6, mesh=mesh)
    assert max(traces) * FORCED_DEVICES == 456  # 449 rows, rounded up to a multiple of 8
    assert_identical(one, sharded)


def test_a_clamped_batch_resumes_bit_identically(lenet, digits, tmp_path):
    model, params = lenet
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    path = tmp_path / "p.npz"
    interrupted_run(prb, params, x, y, path, stop_at=2, batch_size=50, every=1)
    resumed = streaming.compute_spectrum(prb, params, x, y, batch_size=10**5, checkpoint_path=path)
    assert_identical(streaming.compute_spectrum(prb, params, x, y), resumed)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 3.5}, "batch_size must be a positive integer; got 3.5"),
        ({"batch_size": True}, "batch_size must be a positive integer; got True"),
        ({"batch_size": 0}, "batch_size must be a positive integer; got 0"),
        ({"batch_size": "64"}, "batch_size must be a positive integer; got '64'"),
        ({"checkpoint_every": 2.5}, "checkpoint_every must be a positive integer; got 2.5"),
        ({"checkpoint_every": 0}, "checkpoint_every must be a positive integer; got 0"),
        ({"checkpoint_every": None}, "checkpoint_every must be a positive integer; got None"),
    ],
)
def test_compute_options_must_be_integers(lenet, digits, tmp_path, options, message):
    model, params = lenet
    with pytest.raises(InputError, match=message):
        streaming.compute_spectrum(probe.model_probe(model, params), params, digits.x_test[:40],
                                   digits.y_test[:40], checkpoint_path=tmp_path / "p.npz",
                                   **options)  # fmt: skip
    assert not (tmp_path / "p.npz").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_classes": 10.5}, "num_classes must be an integer; got 10.5"),
        ({"num_classes": True}, "num_classes must be an integer; got bool True"),
        ({"total": 2.5}, "total must be an integer; got 2.5"),
    ],
)
def test_accumulate_options_must_be_integers(lenet, digits, options, message):
    model, params = lenet
    batches = data.iterate_batches(digits.x_test[:40], digits.y_test[:40], batch_size=8)
    with pytest.raises(InputError, match=message):
        streaming.accumulate_spectrum(probe.model_probe(model, params), params, batches, **options)


# --------------------------------------------------------------------------- 7: kill -9


def test_killed_and_resumed_run_is_identical(lenet, digits, tmp_path):
    """A process killed with SIGKILL after its fourth save; a new one resumes the file."""
    path = tmp_path / "killed.partial.npz"
    script = textwrap.dedent(
        f"""
        import os, signal, jax
        from deepfault_jax import data, probe, streaming, zoo
        ds = data.load_dataset("digits")
        model = zoo.create_model("lenet1", input_shape=ds.input_shape, num_classes=10)
        params = zoo.init_params(jax.random.key(0), model)
        def die(done, _):
            if done == 9:
                os.kill(os.getpid(), signal.SIGKILL)
        streaming.compute_spectrum(probe.model_probe(model, params), params, ds.x_test,
                                   ds.y_test, batch_size=16, checkpoint_path={str(path)!r},
                                   checkpoint_every=2, callback=die)
        """
    )
    env = {**os.environ, "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=300,
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert metadata_of(path)["position"] == 128 and metadata_of(path)["complete"] is False
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    model, params = lenet
    prb = probe.model_probe(model, params)
    resumed = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test,
                                         batch_size=48, checkpoint_path=path)  # fmt: skip
    assert_identical(streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test), resumed)
