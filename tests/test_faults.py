"""Planted faults change the model where they say, by the drop they say; the registry is whole."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest

from deepfault_jax import (
    faults,
    probe,
    training,
    zoo,
)

# digits has about 360 test inputs: a window of (0.005, 0.01) would be 2-3 of them
WINDOW = (0.02, 0.08)
TRIES = 16


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


def _unflat(model, params, flat: dict[str, np.ndarray]):
    """``flat`` (as :func:`_flat` gives it) as the model's parameters."""
    p = faults._Params(model, params)
    for name, value in flat.items():
        layer, leaf = name.split("/")
        p.tree[layer][leaf] = np.asarray(value, np.float32)
    return p.build()


def _own(p: faults._Params, fault: faults.PlantedFault, flat) -> dict[str, np.ndarray]:
    """Which parameters a fault may change: its neuron's incoming slice and bias (incoming
    kinds), its bias (activation kinds), its outgoing slice (output-coupled, outgoing,
    always_on)."""
    mask = {k: np.zeros(v.shape, bool) for k, v in flat.items()}
    layer, unit, kind = fault.layer, fault.unit, fault.kind
    if fault.family == "incoming":
        mask[f"{layer}/kernel"][..., unit] = True
    if fault.family in ("incoming", "activation") and kind not in ("corrupt_in", "in_zero"):
        mask[f"{layer}/bias"][unit] = True
    if fault.family in ("output-coupled", "outgoing") or kind == "always_on":
        consumer, idx = p.outgoing(layer, unit)
        mask[f"{consumer}/kernel"][idx] = True
    return mask


CASES = [(name, kind) for name in ("mlp-3x50", "lenet5") for kind in faults.FAULT_KINDS] + [
    ("nnx-mlp-3x50", "in_sign"),
    ("nnx-mlp-3x50", "out_scale"),
    ("nnx-mlp-3x50", "always_on"),
    ("lenet1", "push_last"),  # a conv channel feeding the logits
    ("lenet1", "out_swap"),
]
# out_swap between two of dense_1's 84 consumers rarely matters: probe the layers where it can
LAYERS = {("lenet5", "out_swap"): ["conv_0", "conv_1", "dense_1"]}


@pytest.mark.parametrize(("name", "kind"), CASES)
def test_each_fault_changes_only_its_neurons_parameters_by_a_drop_in_the_window(
    models, digits, name, kind
):
    model, params = models[name]
    prb = probe.model_probe(model, params, layers=LAYERS.get((name, kind)))
    x, y = digits.x_test, digits.y_test
    planting = faults.plant_faults(jax.random.key(1), model, params, prb, x, y, kind=kind,
                                   count=2, drop=WINDOW, tries=TRIES)  # fmt: skip
    faulty, planted = planting.params, planting.faults
    assert len(planted) == 2, planting.notes
    assert planting.rejected == sum(" rejected: " in n for n in planting.notes)
    assert len({f.neuron for f in planted}) == 2
    last = prb.index.layer_names[-1]
    for f in planted:
        assert (f.kind, f.family) == (kind, faults.FAULT_FAMILIES[kind])
        assert f.neuron == prb.index.neuron_id(f.layer, f.unit)
        assert (f.target_class is not None) == kind.startswith("push")
        assert f.strength > 0 and (f.strength <= 1 or faults.fault_kind(kind).ladder[-1] > 1)
        if kind == "push_last":
            assert f.layer == last
        if kind == "push_early":
            assert f.layer != last
    # nothing changed outside the planted neurons' own parameters; the faults' own
    # parameters are disjoint, so the model after each fault can be rebuilt from them
    p = faults._Params(model, params)
    a, b = _flat(model, params), _flat(model, faulty)
    masks = [_own(p, f, a) for f in planted]
    for k in a:
        assert not (masks[0][k] & masks[1][k]).any()
        outside = ~(masks[0][k] | masks[1][k])
        np.testing.assert_array_equal(a[k][outside], b[k][outside], err_msg=k)
    current, steps = dict(a), [params]
    accuracy = zoo.accuracy(model, params, x, y)
    for f, mask in zip(planted, masks, strict=True):
        assert any((a[k] != b[k])[mask[k]].any() for k in a), f"{f} changed nothing"
        current = {k: np.where(mask[k], b[k], current[k]) for k in a}
        steps.append(_unflat(model, params, current))
        after = zoo.accuracy(model, steps[-1], x, y)
        assert accuracy - after == pytest.approx(f.accuracy_drop, abs=1e-9)
        assert WINDOW[0] - 1e-9 <= accuracy - after <= WINDOW[1] + 1e-9, f
        accuracy = after
    assert accuracy == zoo.accuracy(model, faulty, x, y)
    _check_kind_effect(model, prb, steps, planted, x, a, b)


def _check_kind_effect(model, prb, steps, planted, x, a, b):
    """What each kind does, beyond which parameters it changes."""
    kind, f = planted[-1].kind, planted[-1]
    before, after = zoo.predict(model, steps[0], x), zoo.predict(model, steps[-1], x)
    if kind.startswith("push"):  # the pushed classes are predicted more often
        targets = {g.target_class for g in planted}
        assert sum(np.sum(after == t) for t in targets) > sum(np.sum(before == t) for t in targets)
    if kind in ("always_on", "dying"):  # active on every input (always_on), on fewer (dying)
        was = faults._raw_values(model, steps[-2], prb, x)["max"][f.layer][:, f.unit] > 0
        now = faults._raw_values(model, steps[-1], prb, x)["max"][f.layer][:, f.unit] > 0
        assert now.all() if kind == "always_on" else now.sum() < was.sum()
    if kind in ("corrupt_in", "in_zero"):
        assert a[f"{f.layer}/bias"][f.unit] == b[f"{f.layer}/bias"][f.unit]
    if kind == "out_swap":  # two consumer units exchanged weights
        consumer, idx = faults._Params(model, steps[0]).outgoing(f.layer, f.unit)
        old, new = a[f"{consumer}/kernel"][idx], b[f"{consumer}/kernel"][idx]
        moved = np.flatnonzero((old != new).reshape(-1, old.shape[-1]).any(axis=0))
        assert len(moved) == 2
        np.testing.assert_allclose(old[..., moved].sum(-1), new[..., moved].sum(-1), atol=1e-5)


def _site(model, params, layer, unit, x, y, key=0):
    prb = probe.model_probe(model, params)
    values = faults._raw_values(model, params, prb, x)
    p = faults._Params(model, params)
    return faults._Site(p, layer, unit, jax.random.key(key), x, y, values, 10)


@pytest.mark.parametrize("name", ["mlp-3x50", "lenet5"])
def test_in_sign_at_full_strength_negates_the_pre_activation(models, digits, name):
    model, params = models[name]
    pre = probe.model_probe(model, params, values="pre")
    x, y = digits.x_test[:100], digits.y_test[:100]
    kind = faults.fault_kind("in_sign")
    _, before = pre(params, x)
    for layer in pre.index.layer_names:
        site = _site(model, params, layer, 3, x, y)
        faulty = kind.apply(site, kind.prepare(site), 1.0).build()
        _, after = pre(faulty, x)
        np.testing.assert_array_equal(
            np.asarray(after[layer])[:, 3], -np.asarray(before[layer])[:, 3]
        )
        others = np.arange(pre.index.layer_sizes[pre.index.layer_names.index(layer)]) != 3
        np.testing.assert_array_equal(np.asarray(after[layer])[:, others],
                                      np.asarray(before[layer])[:, others])  # fmt: skip


@pytest.mark.parametrize("kind", ["in_sign", "in_zero"])
@pytest.mark.parametrize("layer", ["conv_1", "dense_0"])
def test_a_larger_fraction_changes_a_superset_of_the_weights(models, digits, kind, layer):
    model, params = models["lenet5"]
    fk = faults.fault_kind(kind)
    site = _site(model, params, layer, 2, digits.x_test, digits.y_test, key=5)
    prep = fk.prepare(site)
    w = site.p.kernel(layer)[..., 2]
    previous = np.zeros(w.shape, bool)
    for s in fk.ladder:
        changed = fk.apply(site, prep, s).kernel(layer)[..., 2] != w
        assert changed.sum() == max(1, round(s * w.size))
        assert (changed | ~previous).all(), s  # every weight changed before still is
        previous = changed
    changed_bias = fk.apply(site, prep, 1.0).tree[layer]["bias"][2] != site.p.tree[layer]["bias"][2]
    assert changed_bias == (kind == "in_sign")
    if kind == "in_zero":  # the largest |w| go first
        q = fk.apply(site, prep, 0.3).kernel(layer)[..., 2]
        assert np.abs(w[q == 0]).min() >= np.abs(w[q != 0]).max()


def test_out_swap_and_dying_do_what_their_docstrings_say(models, digits):
    model, params = models["lenet5"]
    x, y = digits.x_test, digits.y_test
    swap = faults.fault_kind("out_swap")
    site = _site(model, params, "conv_1", 4, x, y)  # a channel read by dense_0, 4 positions
    prep = swap.prepare(site)
    consumer, idx = site.p.outgoing("conv_1", 4)
    old = site.p.kernel(consumer)[idx]
    a, b = prep["a"], prep["b"]
    assert a == np.argmax(old.sum(axis=0)) and b != a
    for s in (0.3, 0.5, 1.0):
        new = swap.apply(site, prep, s).kernel(consumer)[idx]
        np.testing.assert_allclose(new[:, a], (1 - s) * old[:, a] + s * old[:, b], rtol=1e-6)
        np.testing.assert_allclose(new[:, b], (1 - s) * old[:, b] + s * old[:, a], rtol=1e-6)
        keep = np.setdiff1d(np.arange(old.shape[-1]), [a, b])
        np.testing.assert_array_equal(new[:, keep], old[:, keep])
    dying = faults.fault_kind("dying")
    site = _site(model, params, "dense_0", 7, x, y)
    prep = dying.prepare(site)
    active = site.values["max"]["dense_0"][:, 7] > 0
    prb = probe.model_probe(model, params)
    for s in (0.25, 0.5, 1.0):
        q = dying.apply(site, prep, s).build()
        z = faults._raw_values(model, q, prb, x)["max"]["dense_0"][:, 7]
        silenced = np.mean(z[active] <= 1e-5)
        assert silenced == pytest.approx(s, abs=2 / active.sum() + 1e-9)
        assert not (z[~active] > 0).any()


def test_calibration_climbs_the_ladder_then_bisects_into_the_window():
    """On a fault whose drop is a known function of its strength."""

    def calibrate(drop_of, lo, hi, ladder=(1.0, 2.0, 4.0, 8.0)):
        kind = faults.FaultKind("fake", "test", ladder, "any", "a drop of f(s)", lambda _, __, s: s)
        return faults._calibrate(kind, None, {}, lambda s: 0.9 - drop_of(s), 0.9, lo, hi)

    # the first step reaching lo is in the window: taken as is
    assert calibrate(lambda s: 0.01 * s, 0.02, 0.03)[:2] == (2.0, 2.0)
    # 4 overshoots (0.04 > 0.035): bisected between 2 and 4, to 3 (0.03)
    strength, _, acc = calibrate(lambda s: 0.01 * s, 0.025, 0.035)
    assert strength == 3.0 and 0.9 - acc == pytest.approx(0.03)
    # the first step overshoots: bisected from 0 (1 -> 0.5 -> 0.25)
    assert calibrate(lambda s: 0.1 * s, 0.02, 0.03)[0] == 0.25
    # a jump over the window: 8 bisections cannot land in it
    why = calibrate(lambda s: 0.0 if s < 3.3 else 0.5, 0.02, 0.03)
    assert why.startswith("drop 0.5000 > 0.03 at strength 4, and 8 bisections from 2 missed")
    # never reaching lo
    why = calibrate(lambda s: 0.001 * s, 0.02, 0.03)
    assert why == "drop 0.0080 < 0.02 at the largest strength 8"


def test_a_window_no_fault_reaches_rejects_every_attempt(models, digits):
    model, params = models["mlp-3x50"]
    prb = probe.model_probe(model, params)
    planting = faults.plant_faults(
        jax.random.key(0), model, params, prb, digits.x_test, digits.y_test,
        kind="in_scale", count=2, drop=(0.9, 0.95), tries=3,
    )  # fmt: skip
    assert planting.faults == []
    assert planting.rejected == 3
    rejected = [n for n in planting.notes if " rejected: " in n]
    assert len(rejected) == 3 and all("< 0.9 at the largest strength 64" in n for n in rejected)
    assert planting.notes[-1].startswith("fault 1 of 2 (in_scale) not planted")
    assert "3 attempts rejected" in planting.notes[-1]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(planting.params), strict=True)
    )
    faulty, planted, notes, count = planting  # a NamedTuple of four fields
    assert (planted, count) == ([], 3)


@pytest.mark.parametrize(
    "drop", [(0.01, 0.005), (0, 0.01), (0.01, 1), (math.nan, 0.01), (0.01, math.inf),
             (0.01,), (0.01, 0.02, 0.03), "ab", None, 0.01]
)  # fmt: skip
def test_a_bad_window_is_refused(models, digits, drop):
    model, params = models["mlp-3x50"]
    prb = probe.model_probe(model, params)
    with pytest.raises(ValueError, match=r"drop must be two finite floats \(lo, hi\) with "
                                         r"0 < lo < hi < 1; got "):  # fmt: skip
        faults.plant_faults(jax.random.key(0), model, params, prb, digits.x_test,
                            digits.y_test, kind="in_scale", drop=drop)  # fmt: skip


def test_plant_errors(models, digits):
    model, params = models["mlp-3x50"]
    x, y = digits.x_test, digits.y_test
    prb = probe.model_probe(model, params)
    with pytest.raises(ValueError, match="kind must be one of push_last, push_early, .*dying; "
                                         "got 'flip'"):  # fmt: skip
        faults.plant_faults(jax.random.key(0), model, params, prb, x, y, kind="flip")
    lenet, lenet_params = models["lenet5"]
    with pytest.raises(ValueError, match="conv_reduce must be 'mean' or 'max'; got 'none'"):
        faults.plant_faults(jax.random.key(0), lenet, lenet_params,
                            probe.model_probe(lenet, lenet_params, conv_reduce="none"), x, y,
                            kind="push_last")  # fmt: skip
    one = probe.model_probe(model, params, layers=["dense_1"])
    with pytest.raises(ValueError, match="push_early needs two or more probed layers"):
        faults.plant_faults(jax.random.key(0), model, params, one, x, y, kind="push_early")
    for option, value in (("count", 0), ("tries", 1.5)):
        with pytest.raises(ValueError, match=f"{option} must be a positive integer; got"):
            faults.plant_faults(jax.random.key(0), model, params, prb, x, y, kind="in_scale",
                                **{option: value})  # fmt: skip


def test_the_registry_lists_every_kind_by_family():
    assert faults.FAULT_KINDS == ("push_last", "push_early", "always_on", "corrupt_in", "in_sign",
                                  "in_scale", "in_zero", "out_swap", "out_scale", "dying")  # fmt: skip
    assert faults.fault_kinds() == faults.FAULT_KINDS
    assert faults.fault_kinds("output-coupled") == ("push_last", "push_early")
    assert faults.fault_kinds("activation") == ("always_on", "dying")
    assert faults.fault_kinds("incoming") == ("corrupt_in", "in_sign", "in_scale", "in_zero")
    assert faults.fault_kinds("outgoing") == ("out_swap", "out_scale")
    assert sum(len(faults.fault_kinds(f)) for f in set(faults.FAULT_FAMILIES.values())) == 10
    for name in faults.FAULT_KINDS:
        kind = faults.fault_kind(name)
        assert (kind.name, kind.family) == (name, faults.FAULT_FAMILIES[name])
        assert kind.layers in ("last", "early", "any")
        assert kind.summary and "\n" not in kind.summary
        assert kind.apply.__doc__ and "<-" in kind.apply.__doc__  # its mathematics
        assert f"``{name}``" in faults.__doc__
        ladder = np.asarray(kind.ladder)
        assert ladder[0] > 0 and (np.diff(ladder) > 0).all()
        if name in ("in_sign", "in_zero", "out_swap", "dying"):  # fractions
            assert ladder[-1] == 1.0
    assert faults.fault_kind("push_last").layers == "last"
    assert faults.fault_kind("push_early").layers == "early"
    with pytest.raises(dataclasses.FrozenInstanceError):
        faults.fault_kind("in_sign").ladder = (1.0,)
    with pytest.raises(ValueError, match="kind must be one of push_last, .*; got 'nope'"):
        faults.fault_kind("nope")
    with pytest.raises(ValueError, match="family must be one of output-coupled, activation, "
                                         "incoming, outgoing; got 'other'"):  # fmt: skip
        faults.fault_kinds("other")
