"""Planted faults change the model where they say; the benchmark scores localizers honestly."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_cli import assert_usage_error, run_cli

from deepfault_jax import (
    ablation,
    faultbench,
    faults,
    localize,
    pipeline,
    probe,
    streaming,
    training,
    zoo,
)


@pytest.fixture(scope="module")
def models(digits):
    out = {}
    for name, epochs in (("mlp-3x50", 10), ("lenet5", 3), ("nnx-mlp-3x50", 10), ("lenet1", 5)):
        model = zoo.create_model(name, input_shape=digits.input_shape, num_classes=10)
        out[name] = (model, training.train(jax.random.key(0), model, digits, epochs=epochs).params)
    return out


def _flat(model, params) -> dict[str, np.ndarray]:
    from flax import nnx

    tree = nnx.to_pure_dict(params) if model.is_nnx else params
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(tree)
    }


@pytest.mark.parametrize("kind", faults.FAULT_KINDS)
@pytest.mark.parametrize("name", ["mlp-3x50", "lenet5", "nnx-mlp-3x50", "lenet1"])
def test_each_fault_kind_changes_predictions_and_only_its_neurons_weights(
    models, digits, name, kind
):
    model, params = models[name]
    prb = probe.model_probe(model, params)
    x, y = digits.x_test, digits.y_test
    faulty, planted, notes = faults.plant_faults(
        jax.random.key(1), model, params, prb, x, y, kind=kind, count=2, min_drop=0.02
    )
    assert len(planted) == 2, notes
    before, after = zoo.predict(model, params, x), zoo.predict(model, faulty, x)
    assert (before != after).sum() > 0
    acc_before, acc_after = np.mean(before == y), np.mean(after == y)
    assert acc_before - acc_after >= 0.04 - 1e-9  # two faults, each at least 0.02
    assert sum(f.accuracy_drop for f in planted) == pytest.approx(acc_before - acc_after)
    assert len({f.neuron for f in planted}) == 2
    last = prb.index.layer_names[-1]
    for f in planted:
        assert f.neuron == prb.index.neuron_id(f.layer, f.unit)
        assert f.accuracy_drop >= 0.02
        if kind == "push_last":
            assert f.layer == last
        if kind == "push_early":
            assert f.layer != last
        assert (f.target_class is not None) == kind.startswith("push")
    # which weights changed: the planted neurons' incoming (corrupt_in, always_on's bias)
    # or outgoing (push_*, always_on) weights, and nothing else
    a, b = _flat(model, params), _flat(model, faulty)
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    layers = [f.layer for f in planted]
    order = sorted({k.split("/")[0] for k in a}, key=faults._order)
    consumers = [order[order.index(layer) + 1] for layer in layers]
    if kind == "corrupt_in":
        assert changed <= {f"{layer}/kernel" for layer in layers}
    elif kind == "always_on":
        assert changed <= {f"{c}/kernel" for c in consumers} | {f"{layer}/bias" for layer in layers}
    else:
        assert changed <= {f"{c}/kernel" for c in consumers}
    assert changed
    # inside a changed array, only the planted units' slices moved
    slices = faults._Params(model, params)
    for name in changed:
        layer, leaf = name.split("/")
        touched = np.zeros(a[name].shape, bool)
        for f, consumer in zip(planted, consumers, strict=True):
            if layer == consumer and leaf == "kernel":
                touched[slices.outgoing(f.layer, f.unit)[1]] = True
            if layer == f.layer:
                touched[..., f.unit] = True
        np.testing.assert_array_equal(a[name][~touched], b[name][~touched])
    if kind.startswith("push"):
        # the pushed classes are predicted more often
        targets = {f.target_class for f in planted}
        assert sum(np.sum(after == t) for t in targets) > sum(np.sum(before == t) for t in targets)
    if kind == "always_on":
        # the last fault planted is active on every input, at every position
        every = probe.model_probe(model, faulty, conv_reduce="none")
        _, acts = every(faulty, x)
        f = planted[-1]
        channels = b[f"{f.layer}/kernel"].shape[-1]
        value = np.asarray(acts[f.layer]).reshape(len(x), -1, channels)[:, :, f.unit]
        assert (value > 0).all()


def test_a_fault_that_changes_nothing_is_not_planted(models, digits):
    model, params = models["mlp-3x50"]
    prb = probe.model_probe(model, params)
    # a drop of 0.9 is out of reach of any single neuron of this kind
    faulty, planted, notes = faults.plant_faults(
        jax.random.key(0), model, params, prb, digits.x_test, digits.y_test,
        kind="corrupt_in", count=1, min_drop=0.9, tries=2,
    )  # fmt: skip
    assert planted == []
    assert any("not planted" in n for n in notes)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(faulty), strict=True)
    )


def test_plant_errors(models, digits):
    model, params = models["mlp-3x50"]
    x, y = digits.x_test, digits.y_test
    prb = probe.model_probe(model, params)
    with pytest.raises(ValueError, match="kind must be one of push_last"):
        faults.plant_faults(jax.random.key(0), model, params, prb, x, y, kind="flip")
    lenet, lenet_params = models["lenet5"]
    with pytest.raises(ValueError, match="conv_reduce must be 'mean' or 'max'; got 'none'"):
        faults.plant_faults(jax.random.key(0), lenet, lenet_params,
                            probe.model_probe(lenet, lenet_params, conv_reduce="none"), x, y,
                            kind="push_last")  # fmt: skip
    one = probe.model_probe(model, params, layers=["dense_1"])
    with pytest.raises(ValueError, match="push_early needs two or more probed layers"):
        faults.plant_faults(jax.random.key(0), model, params, one, x, y, kind="push_early")


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
