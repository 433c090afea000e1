"""The planted-fault benchmark scores localizers honestly: ranks, recall, the command."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_cli import assert_usage_error, run_cli

from deepfault_jax import ablation, faultbench, faults, localize, pipeline, probe, streaming


def test_tie_aware_ranks_recall_and_best_rank_over_classes():
    score = np.array([0.5, 0.9, 0.5, 0.1, np.inf, 0.5])
    r = faultbench.tie_ranks(score)
    # inf first, then 0.9, then three tied at 0.5 (ranks 3..5), then 0.1
    np.testing.assert_array_equal(r.first, [3, 2, 3, 6, 1, 3])
    np.testing.assert_array_equal(r.last, [5, 2, 5, 6, 1, 5])
    # a tie across the cut counts as the expectation: ranks 3..5 against top-4 -> 2/3
    ranks = faultbench.Ranks(np.array([3, 1, 12, 2, 7]), np.array([5, 1, 14, 2, 7]))
    got = faultbench.recall_and_rank(ranks, [0, 2])
    assert got["mean_rank"] == pytest.approx((4 + 13) / 2)
    assert got["top5_recall"] == pytest.approx(0.5)
    assert got["top10_recall"] == pytest.approx(0.5)
    tie = faultbench.recall_and_rank(faultbench.Ranks(np.array([9]), np.array([12])), [0])
    assert tie["top10_recall"] == pytest.approx(2 / 4) and tie["top5_recall"] == 0.0
    per_class = np.array([
        [0.1, 0.9, 0.5, 0.0, 0.3],   # ranks 4, 1, 2, 5, 3
        [0.8, 0.2, 0.7, 0.0, 0.1],   # ranks 1, 3, 2, 5, 4
        [0.0, 0.0, 0.0, 0.0, 0.0],   # no evidence: left out
    ])  # fmt: skip
    # best ranks: 1, 1, 2, 5, 3 -> neurons 0 and 1 tie for ranks 1..2
    best = faultbench._best_class_rank(per_class)
    np.testing.assert_array_equal(best.first, [1, 1, 3, 5, 4])
    np.testing.assert_array_equal(best.last, [2, 2, 3, 5, 4])
    flat = faultbench._best_class_rank(np.zeros((2, 4)))
    np.testing.assert_array_equal(flat.first, [1, 1, 1, 1])
    np.testing.assert_array_equal(flat.last, [4, 4, 4, 4])


def test_method_ranks_follow_the_measures(models, digits):
    model, params = models["mlp-3x50"]
    prb = probe.model_probe(model, params)
    s = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, attribution=True)
    ab = ablation.exact_ablation(prb, params, digits.x_test, digits.y_test)
    ranks = faultbench.method_ranks(s, faultbench.default_methods(), ablation=ab)
    assert set(ranks) == set(faultbench.default_methods())
    for method, r in ranks.items():
        assert (1 <= r.first).all() and (r.first <= r.last).all() and (r.last <= 150).all(), method
    for method, score in (("ochiai/pooled", localize.suspiciousness(s, "ochiai", pooled=True)),
                          ("ablation/pooled", ablation.ablation_scores(ab))):  # fmt: skip
        score = np.asarray(score)
        r = ranks[method]
        for n in range(150):
            assert r.first[n] == 1 + np.sum(score > score[n])
            assert r.last[n] == np.sum(score >= score[n])
    with pytest.raises(ValueError, match="NAME/pooled or NAME/per-class"):
        faultbench.method_ranks(s, ["ochiai"])
    with pytest.raises(ValueError, match="needs an exact ablation"):
        faultbench.method_ranks(s, ["ablation/pooled"])


def test_faultbench_command_writes_json_markdown_and_figure(capsys, tmp_path, model_cache):
    out = tmp_path / "fb"
    code, stdout, err = run_cli(capsys, "faultbench", "--models", "mlp-3x50", "--kinds",
                                "push_last,always_on", "--faults", "1,2", "--seeds", "0,1",
                                "--inputs", "300", "--out", str(out), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert json.loads((out / "faultbench.json").read_text()) == result
    md = (out / "faultbench.md").read_text()
    assert "## mlp-3x50" in md and "### 2 planted faults" in md and "| gradxact/pooled |" in md
    assert (out / "faultbench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["trials"]) == 2 * 2 * 2
    methods = set(result["config"]["methods"])
    assert methods == set(faultbench.default_methods())
    for count in (1, 2):
        rows = {r["method"]: r for r in result["summary"] if r["faults"] == count}
        assert set(rows) == methods | {"random", "random (expected)"}
        assert rows["random (expected)"]["top10_recall"] == pytest.approx(10 / 150)
        assert rows["random (expected)"]["mean_rank"] == pytest.approx(75.5)
        for r in rows.values():
            assert 0 <= r["top5_recall"] <= r["top10_recall"] <= 1
            assert 1 <= r["mean_rank"] <= 150
    for t in result["trials"]:
        assert not t["skipped"] and len(t["faults"]) == t["count"]
        assert t["accuracy_before"] - t["accuracy_after"] >= 0.02 * t["count"] - 1e-9
        assert len({f["neuron"] for f in t["faults"]}) == t["count"]


def test_faultbench_summary_recomputes_from_trials(tmp_path, model_cache):
    config = faultbench.FaultbenchConfig(models=("mlp-3x50",), kinds=("corrupt_in",), faults=(1,),
                                       seeds=(0, 1, 2), inputs=200,
                                       methods=("ochiai/pooled", "gradxact/per-class"))  # fmt: skip
    result = pipeline.faultbench(config, tmp_path)
    for row in result["summary"]:
        values = [t["scores"][row["method"]]["top10_recall"] for t in result["trials"]]
        assert row["top10_recall"] == pytest.approx(np.mean(values))
        assert row["trials"] == 3
    # a trial's scores are those of its planted neurons: plant again with the same key
    # and rank them from scratch
    trial = result["trials"][1]
    from deepfault_jax import checkpoints, data

    ds = data.load_dataset("digits")
    x, y = ds.x_test[:200], ds.y_test[:200]
    model, params, _ = checkpoints.load_or_train("mlp-3x50", ds, seed=0)
    prb = probe.model_probe(model, params)
    key = jax.random.fold_in(jax.random.key(1), faults.FAULT_KINDS.index("corrupt_in") * 100 + 1)
    faulty, planted, _ = faults.plant_faults(key, model, params, prb, x, y, kind="corrupt_in")
    assert [f.neuron for f in planted] == [f["neuron"] for f in trial["faults"]]
    s = streaming.compute_spectrum(prb, faulty, x, y, attribution=True)
    for method in config.methods:
        want = faultbench.recall_and_rank(faultbench.method_ranks(s, [method])[method],
                                      [f.neuron for f in planted])  # fmt: skip
        assert trial["scores"][method] == pytest.approx(want), method


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--kinds", "flip"], "--kinds: unknown fault kind 'flip'"),
        (["--models", "resnet"], "--models: unknown model 'resnet'"),
        (["--faults", "0"], "--faults must lie in [1, inf]; got 0"),
        (["--conv-reduce", "none"], "invalid choice: 'none' (choose from 'mean', 'max')"),
        (["--methods", "ochiai"], "NAME/pooled or NAME/per-class; got 'ochiai'"),
        (["--methods", "ablation/per-class"], "exact ablation is ranked pooled only"),
        (["--methods", "nope/pooled"], "unknown measure 'nope'"),
        (["--min-drop", "1.5"], "--min-drop must lie in (0, 1); got 1.5"),
    ],
)
def test_faultbench_bad_input_is_one_line_exit_2(capsys, tmp_path, args, fragment):
    code, out, err = run_cli(capsys, "faultbench", "--out", str(tmp_path / "fb"), *args)
    assert_usage_error(code, out, err, fragment)
    assert not (tmp_path / "fb").exists()
