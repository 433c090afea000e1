"""The command line: results, --json, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from deepfault_jax import checkpoints, cli, spectrum_io, training, zoo


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code, out, err, *fragments):
    """Exit code 2, nothing on stdout, one line on stderr holding every fragment; the line."""
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def test_train_json_result_and_checkpoint(capsys, tmp_path):
    out_dir = tmp_path / "ck"
    code, out, err = run_cli(capsys, "train", "--model", "mlp-3x50", "--dataset", "digits",
                             "--seed", "0", "--epochs", "3", "--out", str(out_dir), "--json")  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    for key in ("model", "dataset", "seed", "test_accuracy", "checkpoint", "epochs", "history"):
        assert key in result
    assert (result["model"], result["dataset"], result["seed"], result["epochs"]) == (
        "mlp-3x50", "digits", 0, 3)  # fmt: skip
    assert 0.5 < result["test_accuracy"] <= 1.0
    assert len(result["history"]) == 3
    model, params, meta = checkpoints.load_checkpoint(result["checkpoint"], model="mlp-3x50")
    assert meta["test_accuracy"] == result["test_accuracy"] and meta["seed"] == 0
    from deepfault_jax import data

    digits = data.load_dataset("digits")
    assert zoo.accuracy(model, params, digits.x_test, digits.y_test) == result["test_accuracy"]


def test_train_human_output(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "train", "--model", "lenet1", "--epochs", "1", "--no-progress",
                           "--out", str(tmp_path / "ck"))  # fmt: skip
    assert code == 0
    assert "training lenet1 (relu) on digits: 1348 train / 449 test images of 8x8x1" in out
    assert "test accuracy 0." in out and f"checkpoint {tmp_path / 'ck'}" in out


def test_info_json(capsys):
    code, out, _ = run_cli(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["versions"]["jax"] and info["backend"] == "cpu" and info["devices"]
    assert info["datasets"]["digits"]["available"] is True
    assert info["models"] == list(zoo.MODEL_NAMES)


def test_unknown_model_lists_valid_names(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--model", "resnet", "--out", str(tmp_path / "x"))
    assert_usage_error(code, out, err, "invalid choice: 'resnet'", *zoo.MODEL_NAMES)
    assert not (tmp_path / "x").exists()


def test_unknown_dataset_lists_valid_names(capsys, tmp_path):
    code, out, err = run_cli(capsys, "train", "--dataset", "cifar", "--out", str(tmp_path / "x"))
    assert_usage_error(code, out, err, "unknown data set 'cifar'", "digits", "fashion-mnist",
                       "idx:DIR", "tfds:NAME", "npz:PATH")  # fmt: skip


def test_bad_npz_is_exit_2(capsys, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((4, 3, 3), np.uint8), y_train=[0, 1, 2, 9],
             x_test=np.zeros((2, 3, 3), np.uint8), y_test=[0, 1], num_classes=3)  # fmt: skip
    code, out, err = run_cli(
        capsys, "train", "--dataset", f"npz:{path}", "--out", str(tmp_path / "o")
    )
    assert_usage_error(code, out, err, "labels must lie in [0, 3); got max 9")
    path.write_bytes(b"PK\x03\x04 truncated")
    code, out, err = run_cli(
        capsys, "train", "--dataset", f"npz:{path}", "--out", str(tmp_path / "o")
    )
    assert_usage_error(code, out, err, "not a readable npz file")


def test_corrupt_idx_is_exit_2(capsys, tmp_path):
    from conftest import write_mnist_dir

    directory, _ = write_mnist_dir(tmp_path / "m")
    raw = (directory / "train-images-idx3-ubyte.gz").read_bytes()
    (directory / "train-images-idx3-ubyte.gz").write_bytes(raw[:-20])
    code, out, err = run_cli(capsys, "train", "--dataset", f"idx:{directory}", "--out",
                             str(tmp_path / "o"))  # fmt: skip
    assert_usage_error(code, out, err, "corrupt or truncated gzip data")


def test_unwritable_out_is_exit_2_before_training(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    # a path below a regular file can never be created (root included)
    code, out, err = run_cli(capsys, "train", "--epochs", "1", "--out", str(blocker / "ck"))
    assert_usage_error(code, out, err, "--out must be a writable location", str(blocker / "ck"))
    code, out, err = run_cli(capsys, "train", "--epochs", "1", "--out", str(blocker))
    assert_usage_error(code, out, err, "--out must be a directory; got existing file")
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not bind root")
def test_read_only_out_is_exit_2(capsys, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, out, err = run_cli(capsys, "train", "--epochs", "1", "--out", str(locked / "ck"))
        assert_usage_error(code, out, err, "--out must be a writable location")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["train", "--epochs", "0"], "--epochs must lie in [1, inf]; got 0"),
        (["train", "--batch-size", "-3"], "--batch-size must lie in [1, inf]; got -3"),
        (["train", "--seed", "x"], "--seed must be an integer; got 'x'"),
        (["train", "--activation", "tanh"], "invalid choice: 'tanh'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: COMMAND"),
        (["info", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors(capsys, argv, fragment):
    assert_usage_error(*run_cli(capsys, *argv), fragment)


def test_internal_error_is_exit_1(capsys, monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated defect")

    monkeypatch.setattr(training, "train", broken)
    code, _, err = run_cli(capsys, "train", "--out", str(tmp_path / "ck"))
    assert code == 1
    assert "Traceback" in err and "internal error: simulated defect" in err


@pytest.mark.parametrize("command", [[], ["train"], ["info"]])
def test_help(capsys, command):
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0 and out.startswith("usage: deepfault-jax")
    if command:
        assert "--json" in out


def test_console_script_and_module_exit_codes(tmp_path):
    exe = shutil.which("deepfault-jax")
    base = [exe] if exe else [sys.executable, "-m", "deepfault_jax.cli"]
    ok = subprocess.run([*base, "info", "--json"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["models"] == list(zoo.MODEL_NAMES)
    bad = subprocess.run([*base, "train", "--model", "nope"], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "invalid choice: 'nope'" in bad.stderr
    mod = subprocess.run([sys.executable, "-m", "deepfault_jax.cli", "--version"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert mod.returncode == 0 and mod.stdout.startswith("deepfault-jax ")


# --------------------------------------------------------------------------- spectrum


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "lenet1"
    assert (
        cli.main(["train", "--model", "lenet1", "--epochs", "2", "--out", str(out), "--json"]) == 0
    )
    return out


def _spectrum_arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {
            k: f[k] for k in ("a_pass", "a_fail", "n_pass", "n_fail", "layer_names", "layer_sizes")
        }


def _assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_spectrum_same_npz_for_batch_sizes_7_and_512(capsys, tmp_path, digits_checkpoint):
    results = []
    for b in (7, 512):
        out = tmp_path / f"s{b}.npz"
        code, stdout, err = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                                    "--batch-size", str(b), "--out", str(out), "--json")  # fmt: skip
        assert code == 0, err
        results.append((json.loads(stdout), _spectrum_arrays(out)))
    _assert_same_arrays(results[0][1], results[1][1])
    report = results[0][0]
    assert report["num_inputs"] == 449 and report["num_pass"] + report["num_fail"] == 449
    assert [r["layer"] for r in report["layers"]] == ["conv_0", "conv_1"]
    assert all(0 <= r["active_share_pass"] <= 1 for r in report["layers"])
    assert report["spectrum"] == str(tmp_path / "s7.npz")


@pytest.mark.skipif(__import__("jax").local_device_count() < 4, reason="needs 4 forced CPU devices")
def test_spectrum_same_npz_for_1_and_4_devices(capsys, tmp_path, digits_checkpoint):
    arrays = []
    for d in (1, 4):
        out = tmp_path / f"d{d}.npz"
        code, _, err = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                               "--devices", str(d), "--batch-size", "64", "--out", str(out))  # fmt: skip
        assert code == 0, err
        arrays.append(_spectrum_arrays(out))
    _assert_same_arrays(*arrays)


def test_spectrum_human_summary_and_options(capsys, tmp_path, digits_checkpoint):
    out = tmp_path / "s.npz"
    code, stdout, _ = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                              "--layers", "conv_1", "--conv-reduce", "max", "--values", "post",
                              "--threshold", "0.25", "--split", "train", "--out", str(out))  # fmt: skip
    assert code == 0
    assert "spectrum of lenet1 on digits (train): 1348 inputs" in stdout
    assert "threshold 0.25, post-activation values, conv_reduce max" in stdout
    assert "conv_1" in stdout and "conv_0" not in stdout

    s, meta = spectrum_io.load_spectrum(out, with_metadata=True)
    assert s.threshold == 0.25 and s.index.layer_names == ("conv_1",)
    assert meta["conv_reduce"] == "max" and meta["split"] == "train" and meta["model"] == "lenet1"
    # one vocabulary: "values" counts pre|post values; "activation" is the model's nonlinearity
    assert meta["values"] == "post" and meta["activation"] == "relu"


def test_spectrum_json_names_values_and_activation(capsys, tmp_path, digits_checkpoint):
    code, stdout, err = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                                "--values", "post", "--out", str(tmp_path / "s.npz"), "--json")  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert (report["values"], report["activation"]) == ("post", "relu")
    assert report["model_source"] == str(digits_checkpoint.absolute())


def test_spectrum_save_every_leaves_no_partial(capsys, tmp_path, digits_checkpoint):
    out = tmp_path / "s.npz"
    code, _, err = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                           "--batch-size", "16", "--save-every", "3", "--out", str(out))  # fmt: skip
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]
    plain = tmp_path / "plain.npz"
    assert (
        run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint), "--out", str(plain))[0]
        == 0
    )
    _assert_same_arrays(_spectrum_arrays(out), _spectrum_arrays(plain))


def test_spectrum_with_zoo_model_trains_once_and_caches(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))
    for _ in range(2):
        code, stdout, err = run_cli(capsys, "spectrum", "--model", "mlp-3x50", "--no-progress",
                                    "--out", str(tmp_path / "s.npz"), "--json")  # fmt: skip
        assert code == 0, err
    assert json.loads(stdout)["model_source"] == "zoo:mlp-3x50:relu:seed0"
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert [p.name for p in cached] == ["mlp-3x50-relu-digits-seed0"]
    assert json.loads(stdout)["accuracy"] >= 0.95


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--layers", "conv_9"], "unknown layer 'conv_9'; expected one of conv_0, conv_1"),
        (["--out-suffix"], "unrecognized arguments"),
        (
            ["--batch-size", "10", "--devices", "4"],
            "--batch-size must be a multiple of --devices (4); got 10",
        ),
        (["--devices", "99"], "devices must lie in [1, 8]"),
        (["--conv-reduce", "sum"], "invalid choice: 'sum'"),
    ],
)
def test_spectrum_usage_errors(capsys, tmp_path, digits_checkpoint, extra, fragment):
    code, out, err = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                             "--out", str(tmp_path / "s.npz"), *extra)  # fmt: skip
    assert_usage_error(code, out, err, fragment)
    assert not (tmp_path / "s.npz").exists()


def test_spectrum_checkpoint_for_other_input_shape(capsys, tmp_path, digits_checkpoint):
    path = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 255, (20, 6, 5), dtype=np.uint8), y_train=np.arange(20) % 10,
             x_test=rng.integers(0, 255, (10, 6, 5), dtype=np.uint8), y_test=np.arange(10))  # fmt: skip
    code, out, err = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                             "--dataset", f"npz:{path}", "--out", str(tmp_path / "s.npz"))  # fmt: skip
    assert_usage_error(code, out, err, "trained on input shape (8, 8, 1); expected (6, 5, 1)")
    code, out, err = run_cli(capsys, "spectrum", "--checkpoint", str(digits_checkpoint),
                             "--out", str(tmp_path / "s.txt"))  # fmt: skip
    assert_usage_error(code, out, err, "--out must end in .npz; got")


# --------------------------------------------------------------------------- run


def test_run_last_line_names_every_file_written(capsys, tmp_path, digits_checkpoint):
    from deepfault_jax import pipeline

    out = tmp_path / "run"
    code, stdout, err = run_cli(capsys, "run", "--checkpoint", str(digits_checkpoint),
                                "--measures", "ochiai", "--k", "1", "--inputs-per-class", "2",
                                "--random-repeats", "1", "--no-progress", "--out", str(out))  # fmt: skip
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"wrote {out}/")
    for name in pipeline.RUN_FILES:
        assert name in last and (out / name).is_file(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(pipeline.RUN_FILES)
