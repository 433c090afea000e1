"""The end-to-end run: outputs, numbers recomputable from the files, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

from deepfault_jax import checkpoints, cli, data, pipeline, probe, training, zoo
from deepfault_jax.errors import InputError

SMALL = {"inputs_per_class": 4, "k": (1, 3), "random_repeats": 2}


pytestmark = pytest.mark.usefixtures("model_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = pipeline.RunConfig(**SMALL)
    return config, out, pipeline.run(config, out).to_json()


def test_run_writes_every_output(finished_run):
    config, out, result = finished_run
    names = {
        "report.json",
        "report.md",
        "synthesized.npz",
        "spectrum.npz",
        "misclassification.png",
        "examples.png",
    }
    assert names <= {p.name for p in out.iterdir()}
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "report.md").read_text()
    assert "| measure | k | misclassified | random |" in md and md.count("| tarantula |") == 2
    for png in ("misclassification.png", "examples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["results"]) == 3 * 2 and len(result["random_runs"]) == 2 * 2
    assert result["selection"]["inputs"] == 40 and result["selection"]["skipped_classes"] == []


def test_every_number_in_the_report_is_recomputable(finished_run):
    """From synthesized.npz and the checkpoint alone."""
    config, out, result = finished_run
    report = json.loads((out / "report.json").read_text())
    with np.load(out / "synthesized.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    meta = json.loads(str(arrays["meta"]))
    model, params, _ = checkpoints.load_checkpoint(meta["checkpoint"])
    prb = probe.model_probe(
        model, params, layers=meta["probe"]["layers"], conv_reduce=meta["probe"]["conv_reduce"],
        values=meta["probe"]["values"],
    )  # fmt: skip
    x0, y = arrays["x_original"], arrays["y"]
    np.testing.assert_array_equal(np.argmax(model.apply(params, x0), -1), y)  # correct originals
    digits = data.load_dataset("digits")
    np.testing.assert_array_equal(digits.x_test[arrays["test_index"]], x0)

    def recompute(tag):
        x, table = arrays[f"{tag}__x"], arrays[f"{tag}__table"]
        logits = np.asarray(model.apply(params, x), np.float64)
        pred = logits.argmax(-1)
        np.testing.assert_array_equal(pred, arrays[f"{tag}__pred"])
        loss = np.asarray(
            optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y)
        )
        diff = (x - x0).reshape(len(x), -1).astype(np.float64)
        sets = table[y]
        before = np.take_along_axis(np.asarray(prb.flat(params, x0)[1]), sets, 1)
        after = np.take_along_axis(np.asarray(prb.flat(params, x)[1]), sets, 1)
        t = meta["probe"]["threshold"]
        return {
            "misclassification_rate": np.mean(pred != y),
            "accuracy": np.mean(pred == y),
            "loss": loss.mean(),
            "l1": np.abs(diff).sum(1).mean(),
            "l2": np.sqrt((diff**2).sum(1)).mean(),
            "linf": np.abs(diff).max(1).mean(),
            "linf_max": np.abs(diff).max(),
            "activation_rose": np.mean(after > before),
            "activation_mean_rise": np.mean(after - before),
            "became_active": np.mean((before <= t) & (after > t)),
        }

    checked = 0
    for row in report["results"]:
        mine = recompute(f"{row['measure']}_k{row['k']}")
        for key, value in mine.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (
                row["measure"],
                row["k"],
                key,
            )
            checked += 1
        randoms = [recompute(f"random_k{row['k']}_r{r}") for r in range(config.random_repeats)]
        for key in mine:
            values = [r[key] for r in randoms]
            assert row["random"][key]["mean"] == pytest.approx(np.mean(values), rel=1e-5, abs=1e-6)
            assert row["random"][key]["std"] == pytest.approx(np.std(values), rel=1e-5, abs=1e-6)
            checked += 2
        assert np.abs(arrays[f"{row['measure']}_k{row['k']}__x"] - x0).max() <= config.d + 1e-6
    assert checked > 100
    accuracy = np.mean(np.argmax(model.apply(params, digits.x_test), -1) == digits.y_test)
    assert report["model"]["test_accuracy"] == pytest.approx(accuracy)


def test_random_sets_exclude_the_measures_neurons(finished_run):
    config, out, result = finished_run
    with np.load(out / "synthesized.npz", allow_pickle=False) as f:
        for k in config.k:
            chosen = np.concatenate([f[f"{m}_k{k}__table"] for m in config.measures], axis=1)
            for r in range(config.random_repeats):
                rand = f[f"random_k{k}_r{r}__table"]
                assert rand.shape == (10, k)
                for c in range(10):
                    assert not set(rand[c]) & set(chosen[c])


def test_same_seed_same_report(finished_run, tmp_path):
    config, out, result = finished_run
    again = pipeline.run(config, tmp_path).to_json()
    for a, b in zip(result["results"], again["results"], strict=True):
        assert {k: v for k, v in a.items()} == {k: v for k, v in b.items()}


def test_pgd_mode_run(tmp_path):
    config = pipeline.RunConfig(mode="pgd", steps=5, d=0.15, measures=("ochiai",), **SMALL)
    result = pipeline.run(config, tmp_path).to_json()
    assert result["synthesis"]["step_size"] == pytest.approx(2.5 * 0.15 / 5)
    with np.load(tmp_path / "synthesized.npz", allow_pickle=False) as f:
        x0 = f["x_original"]
        for key in f.files:
            if key.endswith("__x"):
                assert (
                    np.abs(f[key] - x0).max() <= 0.15 + 1e-6
                    and 0 <= f[key].min()
                    and f[key].max() <= 1
                )


def test_class_without_correct_inputs_is_reported(tmp_path):
    digits = data.load_dataset("digits")
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    params = training.train(jax.random.key(0), model, digits, epochs=1).params  # barely trained
    pred = zoo.predict(model, params, digits.x_test)
    never_right = [c for c in range(10) if not np.any((pred == c) & (digits.y_test == c))]
    assert never_right, "the barely trained model should miss some class entirely"
    ck = checkpoints.save_checkpoint(tmp_path / "ck", model, params)
    result = pipeline.run(pipeline.RunConfig(checkpoint=str(ck), **SMALL), tmp_path / "out")
    skipped = result.selection.skipped
    assert [s["class"] for s in skipped] == never_right
    assert "classified correctly" in skipped[0]["reason"]
    assert "skipped" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"d": 0.0}, r"d \(the maximum L-inf distance\) must lie in \(0, 1\]; got 0"),
        ({"d": -1.0}, r"must lie in \(0, 1\]; got -1"),
        ({"d": float("inf")}, "d .* must be a finite number; got inf"),
        ({"d": 1.5}, r"must lie in \(0, 1\]; got 1.5"),
        ({"step_size": float("inf")}, "step_size must be a finite number; got inf"),
        ({"star": float("inf")}, "must be a finite number; got inf"),
        ({"threshold": float("nan")}, "threshold must be a finite number; got nan"),
        ({"seed": 2**64}, r"seed must lie in \[0, 9223372036854775807\]"),
        ({"k": (1, 0)}, r"k must lie in \[1, inf\]; got 0"),
        ({"k": (1, 1)}, r"k must list distinct positive integers; got \[1, 1\]"),
        (
            {"layers": ("logits",)},
            r"layers must be hidden layers of mlp-3x50 \(dense_0, dense_1, dense_2\); got 'logits'",
        ),
        ({"measures": ("tarantula", "nope")}, "unknown localizer 'nope'; expected one of"),
        (
            {"layers": ("dense_2",), "k": (51,)},
            "k must be <= 50, the neurons of the probed layers dense_2; got 51",
        ),
        ({"classes": (3, 12)}, r"classes must lie in \[0, 10\); got \[12\]"),
    ],
)
def test_bad_configuration_is_refused_before_work(tmp_path, config, message):
    with pytest.raises(InputError, match=message):
        pipeline.run(pipeline.RunConfig(**{**SMALL, **config}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_typed_report_is_report_json(finished_run, tmp_path):
    config, out, result = finished_run
    typed = pipeline.run(config, tmp_path / "again")
    assert isinstance(typed, pipeline.RunReport) and typed.to_json()["results"] == result["results"]
    first = typed.results[0]
    assert (first.measure, first.k) == (result["results"][0]["measure"], result["results"][0]["k"])
    assert first.metrics["misclassification_rate"] == result["results"][0]["misclassification_rate"]
    assert typed.selection.rows.size == result["selection"]["inputs"]


def test_run_never_replaces_a_directory_it_did_not_write(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="is not empty and was not written by deepfault-jax"):
        pipeline.run(pipeline.RunConfig(**SMALL), user)
    assert [p.name for p in user.iterdir()] == ["notes.txt"]
    assert (user / "notes.txt").read_text() == "keep me"


def test_failed_run_leaves_the_previous_output_set(finished_run, tmp_path, monkeypatch):
    config, out, result = finished_run
    target = tmp_path / "set"
    pipeline.run(config, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(pipeline.report, "plot_examples", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        pipeline.run(config, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary left behind


def test_run_command(capsys, tmp_path):
    code = cli.main(["run", "--inputs-per-class", "3", "--k", "1,2", "--random-repeats", "1",
                     "--measures", "dstar", "--out", str(tmp_path / "r"), "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert [(r["measure"], r["k"]) for r in result["results"]] == [("dstar", 1), ("dstar", 2)]
    code = cli.main(["run", "--out", str(tmp_path / "h"), "--inputs-per-class", "2", "--k", "1",
                     "--random-repeats", "1", "--no-progress"])  # fmt: skip
    human = capsys.readouterr().out
    assert code == 0 and "misclassified" in human and "wrote" in human


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--d", "0"], "--d must lie in (0, 1]; got 0"),
        (["--k", "1,x"], "--k must be comma-separated integers; got '1,x'"),
        (["--k", "1000"], "k must be <= 150"),
        (["--mode", "fgsm"], "invalid choice: 'fgsm'"),
    ],
)
def test_run_command_usage_errors(capsys, tmp_path, argv, fragment):
    code = cli.main(["run", "--out", str(tmp_path / "r"), *argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "" and fragment in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_run_with_a_checkpoint_for_another_input_shape(capsys, tmp_path):
    model = zoo.create_model("lenet1", input_shape=(28, 28, 1), num_classes=10)
    ck = checkpoints.save_checkpoint(
        tmp_path / "ck", model, zoo.init_params(jax.random.key(0), model)
    )
    code = cli.main(["run", "--checkpoint", str(ck), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "trained on input shape (28, 28, 1); expected (8, 8, 1)" in err


_RUN_CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a shell starts a command
    from jax import monitoring

    target = os.environ["SIGINT_TARGET"]

    def on_event(event, value, **kw):
        # fires as XLA starts compiling the target step: the signal lands mid-compile
        if event.endswith("backend_compile_duration") and kw.get("fun_name") == f"jit({target})":
            print("compiling", target, file=sys.stderr, flush=True)
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()

    monitoring.register_scalar_listener(on_event)
    from deepfault_jax.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("target", ["_step", "_synthesize_batch"])
def test_ctrl_c_during_a_run_exits_130_cleanly_and_writes_nothing(tmp_path, model_cache, target):
    """Ctrl-C while XLA compiles the spectrum step or the synthesis step: exit 130, one
    message, no crash at exit, and no output set (nor a temporary one) left behind."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "SIGINT_TARGET": target}
    out = tmp_path / "out"
    child = subprocess.run(
        [sys.executable, "-c", _RUN_CHILD, "run", "--k", "1", "--random-repeats", "1",
         "--inputs-per-class", "2", "--no-progress", "--out", str(out)],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert f"compiling {target}" in child.stderr, child.stderr
    assert child.returncode == 130, child.stderr
    assert child.stderr.rstrip().endswith("deepfault-jax: interrupted"), child.stderr
    assert "Traceback" not in child.stderr and "Fatal Python error" not in child.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_with_localizers_beyond_the_measures(capsys, tmp_path):
    """Any localizer chooses suspicious sets: per class where it has a per-class variant
    (ablation), else its pooled top k for every class (grad_norm); the measures' sets and
    results are those of a run of the measures alone."""
    from deepfault_jax import localize, localizers, spectrum_io

    base = ["--k", "2", "--inputs-per-class", "2", "--random-repeats", "1", "--no-progress"]
    code = cli.main(["run", "--methods", "ochiai,grad_norm,ablation", *base,
                     "--out", str(tmp_path / "r"), "--json"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["config"]["measures"] == ["ochiai", "grad_norm", "ablation"]
    assert [r["measure"] for r in result["results"]] == ["ochiai", "grad_norm", "ablation"]
    chosen = result["localizers"]
    assert [chosen[m]["selection"] for m in ("ochiai", "grad_norm", "ablation")] == [
        "per-class", "pooled", "per-class"]  # fmt: skip
    assert chosen["grad_norm"]["family"] == "gradient" and chosen["grad_norm"]["seconds"] >= 0
    assert (
        "Suspicious sets of grad_norm (no per-class variant)"
        in (tmp_path / "r" / "report.md").read_text()
    )

    digits = data.load_dataset("digits")
    model, params, _ = checkpoints.load_or_train("mlp-3x50", digits, seed=0)
    prb = probe.model_probe(model, params)
    x, y, batch = digits.x_test, digits.y_test, pipeline.RunConfig().batch_size
    grad_norm = localizers.localize_neurons("grad_norm", prb, params, x, y, batch_size=batch)
    ablation = localizers.localize_neurons("ablation", prb, params, x, y, per_class=True,
                                           batch_size=batch)  # fmt: skip
    saved = spectrum_io.load_spectrum(tmp_path / "r" / "spectrum.npz")
    with np.load(tmp_path / "r" / "synthesized.npz", allow_pickle=False) as f:
        top = localize.top_k_neurons(grad_norm, 2)
        np.testing.assert_array_equal(f["grad_norm_k2__table"], np.tile(top, (10, 1)))
        np.testing.assert_array_equal(f["ablation_k2__table"], localize.top_k_neurons(ablation, 2))
        ochiai_table = f["ochiai_k2__table"]
        np.testing.assert_array_equal(ochiai_table, localize.suspicious_neurons(saved, "ochiai", 2))

    # the measure alone: the same suspicious sets, the same synthesis and figures
    code = cli.main(["run", "--measures", "ochiai", *base, "--out", str(tmp_path / "o"), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    alone = json.loads(captured.out)
    with np.load(tmp_path / "o" / "synthesized.npz", allow_pickle=False) as f:
        np.testing.assert_array_equal(f["ochiai_k2__table"], ochiai_table)
    mine = {k: v for k, v in result["results"][0].items() if k != "random"}
    assert mine == {k: v for k, v in alone["results"][0].items() if k != "random"}
    assert alone["localizers"] == {"ochiai": chosen["ochiai"]}
