"""The command line's input errors: every bad option value is exit 2, one line on stderr
naming the option and the value, before any work, and nothing is written to --out."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_cli import assert_usage_error, run_cli

from deepfault_jax import cli, commands, faultbench, faults, model_source, probe, synthesis, zoo
from deepfault_jax.errors import MAX_SEED, InputError

BIG_SEED = str(MAX_SEED + 1)  # 2**63


@pytest.fixture(autouse=True)
def _empty_cache(tmp_path, monkeypatch):
    """A fresh model cache per test: a test that trains nothing leaves it absent."""
    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))


# (command and options, the option named, the bad value as the message shows it)
BAD_VALUES = [
    # seeds: beyond 2**63 - 1, negative, not an integer
    (["train", "--seed", BIG_SEED], "--seed", BIG_SEED),
    (["train", "--seed", "-1"], "--seed", "-1"),
    (["train", "--seed", "x"], "--seed", "'x'"),
    (["train", "--seed", "1.5"], "--seed", "'1.5'"),
    (["spectrum", "--seed", BIG_SEED], "--seed", BIG_SEED),
    (["spectrum", "--seed", "-3"], "--seed", "-3"),
    (["run", "--seed", BIG_SEED], "--seed", BIG_SEED),
    (["run", "--seed", "-1"], "--seed", "-1"),
    (["faultbench", "--seeds", f"0,{BIG_SEED}"], "--seeds", BIG_SEED),
    (["faultbench", "--seeds", "0,-1"], "--seeds", "-1"),
    (["faultbench", "--seeds", "0,0"], "--seeds", "0,0"),
    (["faultbench", "--seeds", "a,b"], "--seeds", "'a,b'"),
    (["faultbench", "--model-seeds", f"0,{BIG_SEED}"], "--model-seeds", BIG_SEED),
    (["faultbench", "--model-seeds", "-2"], "--model-seeds", "-2"),
    # train
    (["train", "--epochs", "0"], "--epochs", "0"),
    (["train", "--epochs", "2.5"], "--epochs", "'2.5'"),
    (["train", "--batch-size", "0"], "--batch-size", "0"),
    (["train", "--learning-rate", "inf"], "--learning-rate", "inf"),
    (["train", "--learning-rate", "nan"], "--learning-rate", "nan"),
    (["train", "--learning-rate", "0"], "--learning-rate", "0"),
    (["train", "--learning-rate", "fast"], "--learning-rate", "'fast'"),
    (["train", "--activation", "pre"], "--activation", "'pre'"),
    (["train", "--model", "resnet"], "--model", "'resnet'"),
    # spectrum
    (["spectrum", "--threshold", "nan"], "--threshold", "nan"),
    (["spectrum", "--threshold", "inf"], "--threshold", "inf"),
    (["spectrum", "--threshold=-inf"], "--threshold", "-inf"),  # "-inf" alone reads as a flag
    (["spectrum", "--batch-size", "0"], "--batch-size", "0"),
    (["spectrum", "--batch-size", "-512"], "--batch-size", "-512"),
    (["spectrum", "--devices", "0"], "--devices", "0"),
    (["spectrum", "--save-every", "0"], "--save-every", "0"),
    (["spectrum", "--activation", "post"], "--activation", "'post'"),  # now --values post
    (["spectrum", "--activation", "tanh"], "--activation", "'tanh'"),
    (["spectrum", "--values", "mid"], "--values", "'mid'"),
    (["spectrum", "--conv-reduce", "sum"], "--conv-reduce", "'sum'"),
    (["spectrum", "--layers", ","], "--layers", "','"),
    (["spectrum", "--layers", "dense_0,dense_0"], "--layers", "dense_0"),
    (["spectrum", "--model", "resnet"], "--model", "'resnet'"),
    (["spectrum", "--split", "valid"], "--split", "'valid'"),
    # run
    (["run", "--d", "inf"], "--d", "inf"),
    (["run", "--d", "nan"], "--d", "nan"),
    (["run", "--d", "0"], "--d", "0"),
    (["run", "--d", "-0.1"], "--d", "-0.1"),
    (["run", "--d", "2"], "--d", "2"),
    (["run", "--step-size", "inf"], "--step-size", "inf"),
    (["run", "--step-size", "0"], "--step-size", "0"),
    (["run", "--star", "inf"], "--star", "inf"),
    (["run", "--star", "0"], "--star", "0"),
    (["run", "--threshold", "nan"], "--threshold", "nan"),
    (["run", "--steps", "0"], "--steps", "0"),
    (["run", "--inputs-per-class", "0"], "--inputs-per-class", "0"),
    (["run", "--random-repeats", "0"], "--random-repeats", "0"),
    (["run", "--k", "0,5"], "--k", "0"),
    (["run", "--k", "5,5"], "--k", "5,5"),
    (["run", "--k", "a"], "--k", "'a'"),
    (["run", "--k", ","], "--k", "','"),
    (["run", "--classes", "-1"], "--classes", "-1"),
    (["run", "--classes", "1,1"], "--classes", "1,1"),
    (["run", "--classes", "one"], "--classes", "'one'"),
    (["run", "--direction", "up"], "--direction", "'up'"),
    (["run", "--mode", "fgsm"], "--mode", "'fgsm'"),
    (["run", "--measures", "nope"], "--measures", "'nope'"),
    (["run", "--measures", "ochiai,ochiai"], "--measures", "ochiai"),
    (["run", "--methods", "ochiai,grad_nrm"], "--measures", "'grad_nrm'"),
    (["run", "--activation", "pre"], "--activation", "'pre'"),
    (["run", "--values", "relu"], "--values", "'relu'"),
    # faultbench
    (["faultbench", "--faults", "0"], "--faults", "0"),
    (["faultbench", "--faults", "x"], "--faults", "'x'"),
    (["faultbench", "--faults", "1,1"], "--faults", "1,1"),
    (["faultbench", "--inputs", "5"], "--inputs", "5"),
    (["faultbench", "--drop", "0.01:nan"], "--drop", "nan"),
    (["faultbench", "--drop", "0.01:1"], "--drop", "1"),
    (["faultbench", "--drop", "0:0.01"], "--drop", "0"),
    (["faultbench", "--measure-inputs", "5"], "--measure-inputs", "5"),
    (["faultbench", "--tries", "0"], "--tries", "0"),
    (["faultbench", "--conv-reduce", "none"], "--conv-reduce", "'none'"),
    (["faultbench", "--models", "resnet"], "--models", "'resnet'"),
    (["faultbench", "--models", "lenet1,lenet1"], "--models", "lenet1"),
    (["faultbench", "--kinds", "flip"], "--kinds", "'flip'"),
    (["faultbench", "--values", "x"], "--values", "'x'"),
    (["faultbench", "--methods", "ochiai/all"], "--methods", "'ochiai/all'"),
    (["faultbench", "--methods", "grad_snr/per-class"], "--methods", "grad_snr/per-class"),
    (["faultbench", "--methods", "nope"], "--methods", "'nope'"),
]


@pytest.mark.parametrize(
    ("argv", "option", "shown"),
    BAD_VALUES,
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_option_value_is_exit_2_and_writes_nothing(capsys, tmp_path, argv, option, shown):
    out = tmp_path / ("out.npz" if argv[0] == "spectrum" else "out")
    code, stdout, err = run_cli(capsys, *argv, "--out", str(out))
    assert_usage_error(code, stdout, err, option, shown)
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # no model was trained


@pytest.mark.parametrize(
    ("argv", "option", "shown"),
    [
        (["--star", "x"], "--star", "'x'"),
        (["--measure", "tarantula", "--star", "2"], "--star", "tarantula"),  # dstar's only
        (["--star", "2"], "--star is a parameter of dstar", "consensus"),  # the default method
        # the measure checks its parameter (and localize the k) before the file is read
        (["--measure", "dstar", "--star", "inf"], "star must be a finite number", "inf"),
        (["--measure", "dstar", "--star", "-1"], "star must lie in (0, inf]", "-1"),
        (["--k", "ten"], "--k", "'ten'"),
        (["--class", "-1"], "--class", "-1"),
        (["--class", "x"], "--class", "'x'"),
        (["--layers", ","], "--layers", "','"),
        # methods and their options: checked before the spectrum file is read
        (["--method", "nope"], "--method: unknown localizer 'nope'", "grad_norm"),
        (["--measure", "nope"], "--measure: unknown measure 'nope'", "ochiai"),
        (["--measure", "ablation"], "--measure", "use --method ablation"),
        (["--option", "foo=1"], "--option: localizer 'consensus' takes options", "foo"),
        (["--option", "foo"], "--option must be KEY=VALUE", "'foo'"),
        (["--option", "1x=2"], "--option must be KEY=VALUE", "'1x=2'"),
        (["--method", "refit", "--option", "step=1"], "takes options [steps", "step"),
        (["--method", "grad_snr", "--class", "1"], "--class", "grad_snr"),
        (["--method", "grad_norm"], "--method grad_norm needs the model", "--checkpoint DIR"),
        (["--values", "post"], "--values goes with a model", "--spectrum"),
    ],
)
def test_localize_bad_option_value(capsys, tmp_path, argv, option, shown):
    code, out, err = run_cli(capsys, "localize", "--spectrum", str(tmp_path / "s.npz"), *argv)
    assert_usage_error(code, out, err, option, shown)


@pytest.mark.parametrize(
    "argv",
    [
        ["spectrum", "--checkpoint", "{missing}"],
        ["run", "--checkpoint", "{missing}"],
        ["train", "--dataset", "npz:{missing}"],
        ["spectrum", "--dataset", "npz:{missing}"],
        ["run", "--dataset", "idx:{missing}"],
        ["faultbench", "--dataset", "npz:{missing}"],
    ],
)
def test_missing_input_file_is_exit_2_and_writes_nothing(capsys, tmp_path, argv):
    missing = str(tmp_path / "missing")
    out = tmp_path / ("out.npz" if argv[0] == "spectrum" else "out")
    argv = [a.replace("{missing}", missing) for a in argv]
    code, stdout, err = run_cli(capsys, *argv, "--out", str(out))
    assert_usage_error(code, stdout, err, missing)
    assert not out.exists()


def test_localize_missing_spectrum_is_exit_2(capsys, tmp_path):
    code, out, err = run_cli(capsys, "localize", "--spectrum", str(tmp_path / "nope.npz"))
    assert_usage_error(code, out, err, str(tmp_path / "nope.npz"))


# --------------------------------------------------------------------------- seeds


def test_seed_beyond_2_63_is_refused_by_faultbench_config():
    with pytest.raises(InputError, match="seeds must lie in"):
        faultbench.FaultbenchConfig(seeds=(0, 2**63)).validate()
    with pytest.raises(InputError, match="model_seeds must lie in"):
        faultbench.FaultbenchConfig(model_seeds=(-1,)).validate()


# --------------------------------------------------------------------------- JAX_PLATFORMS


@pytest.mark.parametrize("platforms", ["cuda", "cpux"])
def test_unusable_jax_platforms_is_exit_2(tmp_path, platforms):
    env = {**os.environ, "JAX_PLATFORMS": platforms}
    out = tmp_path / "ck"
    for argv in (["info"], ["train", "--epochs", "1", "--out", str(out)]):
        proc = subprocess.run([sys.executable, "-m", "deepfault_jax.cli", *argv], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert f"JAX_PLATFORMS={platforms!r}" in lines[0] and "cpu" in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- faultbench


def test_faultbench_more_faults_than_neurons_is_exit_2_before_training(capsys, tmp_path):
    out = tmp_path / "fb"
    code, stdout, err = run_cli(capsys, "faultbench", "--models", "mlp-3x50,lenet1",
                                "--faults", "1,1000", "--out", str(out))  # fmt: skip
    assert_usage_error(code, stdout, err,
                          "faults must be <= 16, the probed neurons of lenet1; got 1000")  # fmt: skip
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # no model was trained


def test_faultbench_batch_norm_model_is_exit_2_before_training(capsys, tmp_path):
    out = tmp_path / "fb"
    code, stdout, err = run_cli(capsys, "faultbench", "--models", "mlp-3x50,resnet20",
                                "--out", str(out))  # fmt: skip
    assert_usage_error(code, stdout, err, "got 'resnet20', a model with BatchNorm")
    assert "choose among mlp-3x50" in err and "resnet18" not in err
    assert not out.exists()
    assert not (tmp_path / "cache").exists()  # no model was trained


def test_faultbench_config_refuses_more_faults_than_neurons():
    from deepfault_jax import data

    digits = data.load_dataset("digits")
    config = faultbench.FaultbenchConfig(faults=(1, 151))
    config.validate()  # without the data set the neuron count is unknown
    with pytest.raises(InputError, match="faults must be <= 150, the probed neurons of mlp-3x50"):
        config.validate(dataset=digits)
    assert faultbench.FaultbenchConfig(faults=(150,)).probed_neurons(digits) == {"mlp-3x50": 150}
    layers = faultbench.FaultbenchConfig(layers=("dense_9",))
    with pytest.raises(InputError, match="dense_9"):
        layers.validate(dataset=digits)


def test_faultbench_help_offers_only_accepted_conv_reductions(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    code, out, _ = run_cli(capsys, "faultbench", "--help")
    assert code == 0
    accepted = faultbench.FaultbenchConfig.CONV_REDUCTIONS
    assert "none" not in accepted and set(accepted) <= set(probe.CONV_REDUCTIONS)
    assert "--conv-reduce {" + ",".join(accepted) + "}" in out
    assert "none" not in out.split("--conv-reduce", 1)[1].split("--", 1)[0]
    for kind in faults.FAULT_KINDS:
        assert kind in out


@pytest.mark.parametrize("command", ["spectrum", "run", "train"])
def test_help_lists_model_names(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "1000")
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    for name in zoo.MODEL_NAMES:
        assert name in out, name


def test_help_choices_come_from_the_modules(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    code, out, _ = run_cli(capsys, "run", "--help")
    assert code == 0
    assert "{" + ",".join(synthesis.MODES) + "}" in out
    assert "{" + ",".join((*synthesis.DIRECTIONS, "adam")) + "}" in out
    assert "--conv-reduce {" + ",".join(probe.CONV_REDUCTIONS) + "}" in out
    assert "--values {" + ",".join(model_source.VALUES) + "}" in out
    assert "--activation {" + ",".join(zoo.ACTIVATIONS) + "}" in out


def test_defaults_come_from_the_configs():
    from deepfault_jax import pipeline

    run = cli._parser().parse_args(["run"])
    want = pipeline.RunConfig()
    for field in ("model", "activation", "dataset", "seed", "measures", "k", "mode", "d",
                  "step_size", "steps", "direction", "inputs_per_class", "random_repeats",
                  "layers", "conv_reduce", "values", "threshold", "star", "classes"):  # fmt: skip
        assert getattr(run, field) == getattr(want, field), field
    bench = cli._parser().parse_args(["faultbench"])
    want = faultbench.FaultbenchConfig()
    for field in ("models", "dataset", "kinds", "drops", "faults", "seeds", "inputs",
                  "measure_inputs", "methods", "candidates", "top_k", "tries", "layers",
                  "conv_reduce", "values", "model_seeds", "batch_size"):  # fmt: skip
        assert getattr(bench, field) == getattr(want, field), field
    spec = cli._parser().parse_args(["spectrum", "--out", "s.npz"])
    assert (spec.values, spec.activation, spec.conv_reduce) == ("pre", "relu", "mean")
    assert cli._parser().parse_args(["spectrum", "--activation", "leaky_relu", "--values",
                                     "post", "--out", "s.npz"]).activation == "leaky_relu"  # fmt: skip


# --------------------------------------------------------------------------- --out


def test_spectrum_out_existing_foreign_file_is_kept(capsys, tmp_path):
    foreign = tmp_path / "mine.npz"
    np.savez(foreign, weights=np.arange(3))
    before = foreign.read_bytes()
    code, out, err = run_cli(capsys, "spectrum", "--out", str(foreign))
    assert_usage_error(code, out, err, "--out", str(foreign), "not a deepfault-jax spectrum")
    assert foreign.read_bytes() == before
    text = tmp_path / "notes.npz"
    text.write_text("keep me")
    code, out, err = run_cli(capsys, "spectrum", "--out", str(text))
    assert_usage_error(code, out, err, "--out", str(text))
    assert text.read_text() == "keep me"
    assert not (tmp_path / "cache").exists()


def test_spectrum_out_directory_is_exit_2(capsys, tmp_path):
    directory = tmp_path / "d.npz"
    directory.mkdir()
    code, out, err = run_cli(capsys, "spectrum", "--out", str(directory))
    assert_usage_error(code, out, err, "--out", str(directory))
    assert list(directory.iterdir()) == []


def test_spectrum_foreign_partial_file_is_kept(capsys, tmp_path):
    partial = tmp_path / "s.partial.npz"
    partial.write_text("keep me")
    code, out, err = run_cli(capsys, "spectrum", "--save-every", "2", "--out",
                             str(tmp_path / "s.npz"))  # fmt: skip
    assert_usage_error(code, out, err, str(partial))
    assert partial.read_text() == "keep me" and not (tmp_path / "s.npz").exists()


def test_spectrum_out_below_new_directories_creates_nothing_on_error(capsys, tmp_path):
    out = tmp_path / "a" / "b" / "s.npz"
    code, stdout, err = run_cli(capsys, "spectrum", "--checkpoint", str(tmp_path / "missing"),
                                "--out", str(out))  # fmt: skip
    assert code == 2, err
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("command", ["run", "faultbench", "train"])
def test_out_existing_regular_file_is_exit_2_before_work(capsys, tmp_path, command):
    blocker = tmp_path / "report"
    blocker.write_text("keep me")
    code, out, err = run_cli(capsys, command, "--out", str(blocker))
    assert_usage_error(code, out, err, "--out", str(blocker))
    assert blocker.read_text() == "keep me"
    assert not (tmp_path / "cache").exists()


def test_train_out_foreign_directory_is_kept_and_nothing_trained(capsys, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "cat.jpg").write_bytes(b"keep me")
    code, out, err = run_cli(capsys, "train", "--epochs", "1", "--out", str(mine))
    assert_usage_error(
        code, out, err, "--out", str(mine), "is not empty and was not written by deepfault-jax"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["cat.jpg"]
    assert (mine / "cat.jpg").read_bytes() == b"keep me"


# --------------------------------------------------------------------------- main


def test_plain_value_error_in_a_command_is_an_internal_error(capsys, monkeypatch):
    def broken(args):
        raise ValueError("simulated defect")

    monkeypatch.setattr(commands, "cmd_info", broken)
    code, out, err = run_cli(capsys, "info")
    assert code == 1
    assert "Traceback" in err and "internal error: simulated defect" in err


def test_keyboard_interrupt_is_exit_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_info", interrupted)
    code, out, err = run_cli(capsys, "info")
    assert code == 130 and err.strip() == "deepfault-jax: interrupted"


def test_input_error_in_a_command_is_exit_2(capsys, monkeypatch):
    def bad(args):
        raise InputError("x must be 1; got 2")

    monkeypatch.setattr(commands, "cmd_info", bad)
    assert_usage_error(*run_cli(capsys, "info"), "x must be 1; got 2")
