"""``deepfault-jax localize`` with any localizer: from a model (--checkpoint or --model) or a
saved spectrum, its options (--option KEY=VALUE), --list, and its one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_cli import assert_usage_error, run_cli

from deepfault_jax import checkpoints, data, localize, localizers, probe, spectrum_io

pytestmark = pytest.mark.usefixtures("model_cache")


@pytest.fixture(scope="module")
def mlp(model_cache):
    """The cached zoo mlp-3x50 on digits (the one `--model mlp-3x50` loads), its probe, and
    the test split."""
    digits = data.load_dataset("digits")
    model, params, _ = checkpoints.load_or_train("mlp-3x50", digits, seed=0)
    return probe.model_probe(model, params), params, digits.x_test, digits.y_test


def _localize_json(capsys, *argv):
    code, out, err = run_cli(capsys, "localize", *argv, "--no-progress", "--json")
    assert code == 0, err
    return json.loads(out)


def _assert_ranks(result, scores, k):
    want = localize.top_k_neurons(scores, k)
    assert [n["id"] for n in result["neurons"]] == want.tolist()
    assert [n["rank"] for n in result["neurons"]] == list(range(1, k + 1))
    for n in result["neurons"]:
        assert n["score"] == pytest.approx(float(scores[n["id"]]), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize(
    ("method", "options", "per_class"),
    [
        ("ablation", {}, False),
        ("ablation", {}, True),
        ("grad_norm", {}, False),
        ("gain_ablation", {"gains": (-1.0, 0.0, 2.0)}, False),
        ("aggregate", {"methods": ("ablation", "grad_norm"), "combine": "best"}, False),
    ],
)
def test_model_source_equals_localize_neurons(capsys, mlp, method, options, per_class):
    prb, params, x, y = mlp
    argv = ["--model", "mlp-3x50", "--method", method, "--k", "6"]
    argv += [
        a for key, value in options.items() for a in ("--option", f"{key}={json.dumps(value)}")
    ]
    argv += ["--class", "3"] if per_class else []
    result = _localize_json(capsys, *argv)
    scores = localizers.localize_neurons(method, prb, params, x, y, per_class=per_class, **options)
    _assert_ranks(result, scores[3] if per_class else scores, 6)
    info = localizers.localizer_info(method)
    assert (result["method"], result["family"]) == (method, info.family)
    assert result["options"] == json.loads(json.dumps(options))
    assert result["model_source"] == "zoo:mlp-3x50:relu:seed0" and result["spectrum"] is None
    assert result["inputs"] == len(y) and result["dataset"] == "digits"
    assert result["class"] == (3 if per_class else None) and result["seconds"] >= 0
    # no spectrum at hand: the counts are left out, and said so
    assert result["counts"] is False
    assert all(n[c] is None for n in result["neurons"] for c in ("a_s", "a_f", "n_s", "n_f"))


def test_aggregate_of_a_measure_shows_the_counts_of_its_spectrum(capsys, mlp):
    prb, params, x, y = mlp
    result = _localize_json(capsys, "--model", "mlp-3x50", "--method", "aggregate", "--option",
                            'methods=["gradxact","grad_norm"]', "--inputs", "200", "--k", "4")  # fmt: skip
    methods = ("gradxact", "grad_norm")
    scores = localizers.localize_neurons(
        "aggregate", prb, params, x[:200], y[:200], methods=methods
    )
    _assert_ranks(result, scores, 4)
    assert result["options"] == {"methods": list(methods)} and result["inputs"] == 200
    spec = localizers.Evidence(prb, params, x[:200], y[:200]).spectrum()
    a_s, a_f, n_s, n_f = (np.asarray(c) for c in spec.pooled())
    assert result["counts"] is True
    for n in result["neurons"]:
        i = n["id"]
        assert (n["a_s"], n["a_f"], n["n_s"], n["n_f"]) == (a_s[i], a_f[i], n_s[i], n_f[i])


def test_default_method_with_a_checkpoint_and_human_table(capsys, tmp_path, mlp):
    prb, params, x, y = mlp
    digits = data.load_dataset("digits")
    model, _, _ = checkpoints.load_or_train("mlp-3x50", digits, seed=0)
    ck = checkpoints.save_checkpoint(tmp_path / "ck", model, params)
    result = _localize_json(capsys, "--checkpoint", str(ck), "--k", "5")
    assert result["method"] == localizers.DEFAULT_LOCALIZER == "consensus"
    _assert_ranks(result, localizers.localize_neurons("consensus", prb, params, x, y), 5)
    assert result["model_source"] == str(ck.absolute()) and result["counts"] is True
    code, out, err = run_cli(capsys, "localize", "--model", "mlp-3x50", "--method", "grad_norm",
                             "--k", "3", "--no-progress")  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("top 3 neurons by grad_norm (all classes pooled) of zoo:mlp-3x50")
    assert "A_s" not in lines[1] and "score" in lines[1] and len(lines) == 2 + 3 + 2
    assert "no A_s/A_f/N_s/N_f" in lines[-2] and lines[-1].startswith("scored in")


def test_spectrum_source_takes_only_spectrum_localizers(capsys, tmp_path):
    out = tmp_path / "s.npz"
    code, _, err = run_cli(capsys, "spectrum", "--model", "mlp-3x50", "--attribution",
                           "--no-progress", "--out", str(out))  # fmt: skip
    assert code == 0, err
    spec = spectrum_io.load_spectrum(out)
    result = _localize_json(capsys, "--spectrum", str(out), "--method", "gradxact", "--k", "5")
    _assert_ranks(result, localizers.spectrum_scores("gradxact", spec), 5)
    assert result["spectrum"] == str(out) and result["counts"] is True
    assert result["family"] == "attribution" and result["model_source"] is None
    # --measure is --method for measures; --star is --option star=S
    by_star = _localize_json(capsys, "--spectrum", str(out), "--measure", "dstar", "--star", "2")
    by_option = _localize_json(capsys, "--spectrum", str(out), "--method", "dstar", "--option",
                               "star=2")  # fmt: skip
    assert by_star["neurons"] == by_option["neurons"] and by_star["options"] == {"star": 2.0}
    for method in ("grad_norm", "ablation", "aggregate"):
        code, stdout, err = run_cli(capsys, "localize", "--spectrum", str(out), "--method", method)
        assert_usage_error(code, stdout, err, f"--method {method} needs the model",
                           "--checkpoint DIR", "--model NAME --dataset SPEC")  # fmt: skip
    code, stdout, err = run_cli(capsys, "localize", "--spectrum", str(out), "--inputs", "5")
    assert_usage_error(code, stdout, err, "--inputs goes with a model")


def test_list_plain_and_json(capsys):
    code, out, err = run_cli(capsys, "localize", "--list")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["name", "family", "needs", "per-class"]
    names = localizers.localizer_names()
    assert [line.split()[0].rstrip("*") for line in lines[1 : 1 + len(names)]] == list(names)
    row = next(line for line in lines if line.startswith("gain_ablation "))
    assert "ablation" in row and "gates" in row and "gains=" in row and "per neuron" in row
    listed = json.loads(run_cli(capsys, "localize", "--list", "--json")[1])
    assert [r["name"] for r in listed["localizers"]] == list(names)
    assert listed["default"] == localizers.DEFAULT_LOCALIZER
    for r in listed["localizers"]:
        info = localizers.localizer_info(r["name"])
        assert (r["family"], r["needs"], r["per_class"], r["cost"]) == (
            info.family, info.needs, info.per_class, info.cost)  # fmt: skip
        assert r["options"] == json.loads(json.dumps(dict(info.options)))


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--method", "nope"], ["--method: unknown localizer 'nope'", "grad_norm", "ablation"]),
        (["--method", "grad_norm", "--option", "steps=3"],
         ["--option: localizer 'grad_norm' takes options [none]; got steps"]),
        (["--method", "refit", "--option", "stepz=3"], ["takes options [steps,", "got stepz"]),
        (["--option", "steps"], ["--option must be KEY=VALUE", "'steps'"]),
        (["--option", "=3"], ["--option must be KEY=VALUE", "'=3'"]),
        (["--option", "threshold=0", "--option", "threshold=1"], ["'threshold' twice"]),
        (["--method", "grad_norm", "--class", "2"], ["--class", "grad_norm", "per-class"]),
        (["--measure", "grad_norm"], ["--measure", "use --method grad_norm"]),
        (["--k", "151"], ["--k must lie in [1, 150]", "got 151"]),
        (["--method", "ablation", "--class", "10"], ["--class must lie in [0, 10); got 10"]),
        (["--inputs", "450"], ["--inputs must be <= 449", "got 450"]),
        (["--layers", "dense_9"], ["unknown layer 'dense_9'"]),
        (["--method", "grad_norm", "--conv-reduce", "none", "--model", "lenet1"],
         ["localizer 'grad_norm' needs parameters laid out by layer", "conv_reduce 'none'"]),
        (["--method", "aggregate", "--option", 'methods=["grad_snr","nope"]'],
         ["unknown localizer 'nope'"]),
        (["--method", "aggregate", "--option", 'methods={"a":1}'], ["--option values must be"]),
    ],
)  # fmt: skip
def test_model_source_errors_are_exit_2_before_training(capsys, tmp_path, monkeypatch, argv,
                                                        fragments):  # fmt: skip
    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))
    model = [] if "--model" in argv else ["--model", "mlp-3x50"]
    code, out, err = run_cli(capsys, "localize", *model, *argv)
    assert_usage_error(code, out, err, *fragments)
    assert not (tmp_path / "cache").exists()  # nothing was trained


def test_no_source_is_exit_2(capsys):
    code, out, err = run_cli(capsys, "localize", "--method", "ablation")
    assert_usage_error(code, out, err, "--spectrum FILE", "--checkpoint DIR", "--model NAME")
    code, out, err = run_cli(capsys, "localize", "--spectrum", "s.npz", "--model", "lenet1")
    assert_usage_error(code, out, err, "not allowed with")


def test_default_method_on_a_count_only_spectrum_says_what_to_do(capsys, tmp_path):
    out = tmp_path / "counts.npz"
    code, _, err = run_cli(capsys, "spectrum", "--model", "mlp-3x50", "--no-progress",
                           "--out", str(out))  # fmt: skip
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "localize", "--spectrum", str(out))
    assert_usage_error(code, stdout, err, f"the default method {localizers.DEFAULT_LOCALIZER} "
                       "needs the model", "--method ochiai")  # fmt: skip
    result = _localize_json(capsys, "--spectrum", str(out), "--method", "ochiai", "--k", "3")
    spec = spectrum_io.load_spectrum(out)
    _assert_ranks(result, localizers.spectrum_scores("ochiai", spec), 3)
