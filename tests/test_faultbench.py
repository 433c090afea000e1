"""The planted-fault benchmark scores localizers honestly: ranks, recall, leave-one-out, the command."""

from __future__ import annotations

import json
import math

import jax
import matplotlib.colors as mcolors
import numpy as np
import pytest
from matplotlib.patches import Patch
from test_cli import assert_usage_error, run_cli

from deepfault_jax import (
    checkpoints,
    data,
    faultbench,
    faultbench_report,
    faults,
    localizers,
    pipeline,
    zoo,
)

METHODS = ("ochiai", "gradxact", "gradxact/per-class", "grad_norm", "ablation_loss", "aggregate")
WINDOW = (0.01, 0.08)  # digits: 180 measure inputs, one input is 0.0056 of accuracy


def test_tie_aware_ranks_recall_and_best_rank_over_classes():
    score = np.array([0.5, 0.9, 0.5, 0.1, np.inf, 0.5])
    r = faultbench.tie_ranks(score)
    # inf first, then 0.9, then three tied at 0.5 (ranks 3..5), then 0.1
    np.testing.assert_array_equal(r.first, [3, 2, 3, 6, 1, 3])
    np.testing.assert_array_equal(r.last, [5, 2, 5, 6, 1, 5])
    ranks = faultbench.Ranks(np.array([3, 1, 12, 2, 7]), np.array([5, 1, 14, 2, 7]))
    ks = {"top5": 5, "top10": 10, "top4": 4}
    got = faultbench.recall_and_rank(ranks, [0, 2], ks)
    assert got["mean_rank"] == pytest.approx((4 + 13) / 2)
    assert got["top5"] == pytest.approx(0.5)
    assert got["top10"] == pytest.approx(0.5)
    # a tie across the cut counts as the expectation: ranks 3..5 against top-4 -> 2/3
    assert got["top4"] == pytest.approx((2 / 3) / 2)
    tie = faultbench.recall_and_rank(faultbench.Ranks(np.array([9]), np.array([12])), [0], ks)
    assert tie["top10"] == pytest.approx(2 / 4) and tie["top5"] == 0.0
    per_class = np.array([
        [0.1, 0.9, 0.5, 0.0, 0.3],   # ranks 4, 1, 2, 5, 3
        [0.8, 0.2, 0.7, 0.0, 0.1],   # ranks 1, 3, 2, 5, 4
        [0.0, 0.0, 0.0, 0.0, 0.0],   # no evidence: left out
    ])  # fmt: skip
    best = faultbench._best_class_rank(per_class)
    np.testing.assert_array_equal(best.first, [1, 1, 3, 5, 4])
    np.testing.assert_array_equal(best.last, [2, 2, 3, 5, 4])


def test_cutoffs_in_neurons_and_percent():
    assert faultbench.cutoffs(150, (5, 10), (5.0, 10.0)) == {
        "top5": 5, "top10": 10, "top5%": 8, "top10%": 15,
    }  # fmt: skip
    assert faultbench.cutoffs(16, (5, 10), (5.0,)) == {"top5": 5, "top10": 10, "top5%": 1}
    assert faultbench.cutoffs(6, (10,), ()) == {"top10": 6}


def _trial(kind, scores, skipped=None):
    return {"kind": kind, "family": faults.FAULT_FAMILIES[kind], "skipped": skipped,
            "scores": {m: {"top10": v} for m, v in scores.items()}}  # fmt: skip


def test_leave_one_out_chooses_on_the_other_kinds_only():
    a, b = localizers.DEFAULT_LOCALIZER, "ochiai"
    trials = [
        _trial("push_last", {a: 1.0, b: 0.0}),
        _trial("push_last", {a: 0.8, b: 0.2}),
        _trial("in_sign", {a: 0.0, b: 1.0}),
        _trial("in_zero", {a: 0.5, b: 0.4}),
        _trial("in_zero", {a: 0.0, b: 0.0}, skipped="planted 0 of 1"),  # left out
    ]
    rows = {r["kind"]: r for r in faultbench.leave_one_out(trials, [a, b])}
    assert set(rows) == {"push_last", "in_sign", "in_zero"}
    # held out in_sign: on the others a averages 0.767, b 0.2 -> a, which scores 0 there
    assert rows["in_sign"]["chosen"] == a
    assert rows["in_sign"]["chosen_on_others"] == pytest.approx((1.0 + 0.8 + 0.5) / 3)
    assert rows["in_sign"]["chosen_held_out"] == 0.0
    assert rows["in_sign"]["best_held_out"] == b and rows["in_sign"]["best_held_out_score"] == 1.0
    # held out push_last: on the others a 0.25 vs b 0.7 -> b
    assert rows["push_last"]["chosen"] == b
    assert rows["push_last"]["chosen_held_out"] == pytest.approx(0.1)
    assert rows["in_zero"]["trials"] == 1
    by_family = faultbench.leave_one_out(trials, [a, b], by="family")
    assert {r["family"] for r in by_family} == {"output-coupled", "incoming"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("fb") / "fb"
    config = faultbench.FaultbenchConfig(
        models=("mlp-3x50",), kinds=("push_last", "in_scale", "out_scale"), drops=(WINDOW,),
        faults=(1, 2), seeds=(0,), inputs=180, measure_inputs=180, methods=METHODS,
    )  # fmt: skip
    return config, pipeline.faultbench(config, out), out


def test_faultbench_writes_json_markdown_and_figure(bench):
    config, result, out = bench
    assert json.loads((out / "faultbench.json").read_text()) == json.loads(json.dumps(result))
    md = (out / "faultbench.md").read_text()
    assert "## Leave one fault kind out" in md and "| gradxact |" in md
    assert (out / "faultbench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["trials"]) == 3 * 2
    assert result["dataset"] == {"name": "digits", "inputs": 180, "measure_inputs": 180}
    assert result["config"]["methods"] == list(METHODS)


def test_trials_plant_inside_the_window_on_the_measure_inputs(bench, model_cache):
    config, result, _ = bench
    ds = data.load_dataset("digits")
    xm, ym = ds.x_test[180:360], ds.y_test[180:360]
    model, params, _ = checkpoints.load_or_train("mlp-3x50", ds, seed=0)
    done = [t for t in result["trials"] if not t["skipped"]]
    assert done, result["skipped"]
    for t in done:
        assert len(t["faults"]) == t["count"]
        assert len({f["neuron"] for f in t["faults"]}) == t["count"]
        for f in t["faults"]:
            assert WINDOW[0] <= f["accuracy_drop"] <= WINDOW[1]
        assert t["accuracy_before"] == pytest.approx(zoo.accuracy(model, params, xm, ym))
    for t in result["trials"]:
        assert t["rejected"] >= 0
    assert result["rejected"] == sum(t["rejected"] for t in result["trials"])


def test_a_trial_replays_from_its_key(bench, model_cache):
    """Plant again with the trial's key, localize with the entry point, rank from scratch."""
    config, result, _ = bench
    ds = data.load_dataset("digits")
    trial = next(t for t in result["trials"] if not t["skipped"] and t["count"] == 2)
    model, params, _ = checkpoints.load_or_train("mlp-3x50", ds, seed=0)
    prb = config.probe(model, params)
    key = faultbench._trial_key(trial["seed"], trial["kind"], 0, trial["count"], 0)
    planting = faults.plant_faults(key, model, params, prb, ds.x_test[180:360],
                                   ds.y_test[180:360], kind=trial["kind"], count=2,
                                   drop=WINDOW)  # fmt: skip
    ids = [f.neuron for f in planting.faults]
    assert ids == [f["neuron"] for f in trial["faults"]]
    x, y = ds.x_test[:180], ds.y_test[:180]
    n = prb.index.num_neurons
    for method in METHODS:
        name, _, scope = method.partition("/")
        score = localizers.localize_neurons(name, prb, planting.params, x, y,
                                            per_class=scope == "per-class")  # fmt: skip
        ranks = faultbench._best_class_rank(score) if scope else faultbench.tie_ranks(score)
        want = faultbench.recall_and_rank(ranks, ids, faultbench.cutoffs(n, (5, 10), (5, 10)))
        assert trial["scores"][method] == pytest.approx(want), method
    assert trial["scores"]["random (expected)"]["top10"] == pytest.approx(10 / n)
    assert trial["scores"]["random (expected)"]["top10%"] == pytest.approx(math.ceil(n / 10) / n)


def test_summary_and_leave_one_out_recompute_from_trials(bench):
    _, result, _ = bench
    done = [t for t in result["trials"] if not t["skipped"]]
    for row in result["summary"]:
        values = [t["scores"][row["method"]]["top10"] for t in done if t["count"] == row["count"]]
        assert row["top10"] == pytest.approx(np.mean(values))
        assert row["top10_std"] == pytest.approx(np.std(values))
        assert row["trials"] == len(values)
    candidates = result["config"]["candidates"]
    assert set(candidates) <= set(METHODS)
    for row in result["leave_one_kind_out"]:
        others = [t for t in done if t["kind"] != row["kind"]]
        held = [t for t in done if t["kind"] == row["kind"]]
        means = {m: np.mean([t["scores"][m]["top10"] for t in others]) for m in candidates}
        assert means[row["chosen"]] == pytest.approx(max(means.values()))
        assert row["chosen_held_out"] == pytest.approx(
            np.mean([t["scores"][row["chosen"]]["top10"] for t in held])
        )
    for model, per in result["method_seconds"].items():
        assert set(per) == set(METHODS) and all(v >= 0 for v in per.values()), model


def test_figure_bars_are_the_summary_coloured_by_family(bench, tmp_path):
    _, result, _ = bench
    fig = faultbench_report._figure(result)
    (legend,) = fig.legends
    entries = [t.get_text() for t in legend.get_texts()]
    families = list(dict.fromkeys(localizers.localizer_info(m.split("/")[0]).family
                                  for m in METHODS))  # fmt: skip
    assert entries[: len(families)] == families
    colour_of = {t: h.get_facecolor() for t, h in zip(entries, legend.legend_handles, strict=True)
                 if isinstance(h, Patch)}  # fmt: skip
    (ax,) = fig.axes
    rects = [p for p in ax.patches if isinstance(p, __import__("matplotlib").patches.Rectangle)]
    done = [t for t in result["trials"] if not t["skipped"]]
    for method, rect in zip(METHODS, rects, strict=True):
        family = localizers.localizer_info(method.split("/")[0]).family
        assert mcolors.same_color(rect.get_facecolor(), colour_of[family])
        assert rect.get_height() == pytest.approx(
            np.mean([t["scores"][method]["top10"] for t in done])
        )
    path = faultbench_report.plot_faultbench(result, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_faultbench_command_json(capsys, tmp_path, model_cache):
    out = tmp_path / "fb"
    code, stdout, err = run_cli(capsys, "faultbench", "--kinds", "out_scale", "--faults", "1",
                                "--seeds", "0", "--inputs", "180", "--measure-inputs", "180",
                                "--drop", "0.01:0.08", "--methods", "gradxact,grad_norm",
                                "--out", str(out), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert json.loads((out / "faultbench.json").read_text()) == result
    assert result["config"]["drops"] == [[0.01, 0.08]]
    assert result["config"]["candidates"] == ["gradxact", "grad_norm"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--kinds", "flip"], "--kinds: unknown fault kind 'flip'"),
        (["--models", "resnet"], "--models: unknown model 'resnet'"),
        (["--models", "mlp-3x50:tanh"], "unknown activation 'tanh'"),
        (["--faults", "0"], "--faults must lie in [1, inf]; got 0"),
        (["--conv-reduce", "none"], "invalid choice: 'none' (choose from 'mean', 'max')"),
        (["--methods", "nope"], "unknown localizer 'nope'"),
        (["--methods", "grad_norm/per-class"], "grad_norm has no per-class variant"),
        (["--drop", "0.01"], "--drop must be LO:HI windows"),
        (["--drop", "0.05:0.01"], "--drop windows must have LO < HI"),
        (["--drop", "0:0.01"], "--drop must lie in (0, 1)"),
        (["--drop", "0.01:nan"], "--drop must be a finite number"),
        (["--methods", "ochiai", "--candidates", "gradxact"], "candidates must be among"),
    ],
)
def test_faultbench_bad_input_is_one_line_exit_2(capsys, tmp_path, args, fragment):
    code, out, err = run_cli(capsys, "faultbench", "--out", str(tmp_path / "fb"), *args)
    assert_usage_error(code, out, err, fragment)
    assert not (tmp_path / "fb").exists()


def test_localization_and_measure_inputs_are_disjoint_halves_at_most():
    config = faultbench.FaultbenchConfig(inputs=2000, measure_inputs=5000)
    assert config.split(10_000) == (slice(0, 2000), slice(2000, 7000))
    assert config.split(449) == (slice(0, 224), slice(224, 449))
    assert faultbench.FaultbenchConfig(inputs=100, measure_inputs=50).split(449) == (
        slice(0, 100), slice(100, 150),
    )  # fmt: skip


def test_config_refuses_what_cannot_run():
    with pytest.raises(ValueError, match="drops must list at least one value"):
        faultbench.FaultbenchConfig(drops=()).validate()
    with pytest.raises(ValueError, match="a drop window must be LO:HI with LO < HI"):
        faultbench.FaultbenchConfig(drops=((0.02, 0.01),)).validate()
    with pytest.raises(ValueError, match=r"model_seeds must lie in \[0, 9223372036854775807\]"):
        faultbench.FaultbenchConfig(model_seeds=(2**64,)).validate()
    with pytest.raises(ValueError, match="top_k must list distinct values"):
        faultbench.FaultbenchConfig(top_k=(5, 5)).validate()
    jax.random.key(0)  # the module's keys are plain jax keys
