"""``deepfault-jax repair``: outputs every command can read, the input checkpoint kept, and
bad input refused with exit 2 before anything is written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_cli import assert_usage_error, run_cli

from deepfault_jax import checkpoints, cli, probe, repair
from deepfault_jax.neuron_params import pure_params


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def weak_checkpoint(tmp_path_factory):
    """mlp-3x50 on digits after one epoch: a repair still has something to fix."""
    out = tmp_path_factory.mktemp("ck") / "mlp"
    assert cli.main(["train", "--model", "mlp-3x50", "--epochs", "1", "--out", str(out),
                     "--json"]) == 0  # fmt: skip
    return out


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(directory.rglob("*")):
        h.update(str(path.relative_to(directory)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def _leaves(params):
    tree = pure_params(params)
    return {f"{n}/{k}": np.asarray(v) for n, layer in tree.items() for k, v in layer.items()}


def test_repair_writes_a_checkpoint_every_command_reads(capsys, tmp_path, weak_checkpoint):
    before = _digest(weak_checkpoint)
    out = tmp_path / "rep"
    code, stdout, err = run_cli(capsys, "repair", "--checkpoint", str(weak_checkpoint),
                                "--k", "5", "--random-repeats", "2", "--budget", "60",
                                "--out", str(out), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "repair.json", "repair.md"]
    assert json.loads((out / "repair.json").read_text()) == result
    assert _digest(weak_checkpoint) == before  # the input checkpoint is never modified
    rows = result["results"]
    assert set(rows) == {"targeted", "random", "output", "full"}
    assert len(rows["random"]["runs"]) == 2 and len(result["neurons"]) == 5
    assert result["chosen_by"] == "consensus"
    for row in (rows["targeted"], rows["output"], rows["full"], *rows["random"]["runs"]):
        assert row["steps"] <= 60 and row["validation_after"] >= row["validation_before"]
        assert 0 <= row["fix_rate"] <= 1 and 0 <= row["break_rate"] <= 1

    model, original, _ = checkpoints.load_checkpoint(weak_checkpoint)
    model2, repaired, meta = checkpoints.load_checkpoint(out / "checkpoint")
    assert model2 == model
    assert meta["repaired_from"] == str(weak_checkpoint.absolute())
    assert meta["repair"]["neurons"] == [n["id"] for n in result["neurons"]]
    assert meta["repair"]["kept_original"] == result["kept_original"]
    # only the chosen neurons' parameters moved, and the metrics count them
    prb = probe.model_probe(model, original)
    view = repair.neuron_view(prb, original, meta["repair"]["neurons"])
    mask = {f"{n}/{k}": np.zeros(np.shape(v), bool)
            for n, layer in pure_params(original).items() for k, v in layer.items()}  # fmt: skip
    for b in view.blocks:
        mask[f"{b.layer}/{b.leaf}"][b.index] = True
    a, b = _leaves(original), _leaves(repaired)
    changed = 0
    for k in a:
        np.testing.assert_array_equal(a[k][~mask[k]], b[k][~mask[k]], k)
        changed += int(np.count_nonzero(a[k] != b[k]))
    assert changed == rows["targeted"]["changed"]
    assert (changed == 0) == result["kept_original"]
    # the repaired checkpoint serves the other commands
    code, _, err = run_cli(capsys, "spectrum", "--checkpoint", str(out / "checkpoint"),
                           "--out", str(tmp_path / "s.npz"))  # fmt: skip
    assert code == 0, err
    code, text, err = run_cli(capsys, "localize", "--checkpoint", str(out / "checkpoint"),
                              "--method", "ochiai", "--json")  # fmt: skip
    assert code == 0 and len(json.loads(text)["neurons"]) == 10, err
    # a second repair into the same --out replaces the first (its own output)
    code, text, err = run_cli(capsys, "repair", "--checkpoint", str(weak_checkpoint),
                              "--neurons", "3,70", "--baselines", "output", "--budget", "10",
                              "--out", str(out), "--no-progress")  # fmt: skip
    assert code == 0, err
    again = json.loads((out / "repair.json").read_text())
    assert [n["id"] for n in again["neurons"]] == [3, 70] and again["chosen_by"] == "explicit ids"
    assert set(again["results"]) == {"targeted", "output"}
    assert text.strip().splitlines()[-1].startswith(f"wrote {out}/checkpoint, repair.json")
    md = (out / "repair.md").read_text()
    assert "| targeted (explicit ids) |" in md and "| output layer |" in md


def _npz(path: Path, *, n_train: int, nan: bool = False) -> Path:
    rng = np.random.default_rng(0)
    x_train = rng.random((n_train, 8, 8)).astype(np.float32)
    if nan:
        x_train[0, 0, 0] = np.nan
    np.savez(path, x_train=x_train, y_train=np.arange(n_train) % 10,
             x_test=rng.random((10, 8, 8)).astype(np.float32), y_test=np.arange(10),
             num_classes=10)  # fmt: skip
    return path


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--k", "151"], ["k must lie in [1, 150]", "got 151"]),
        (["--neurons", "3,150"], ["neurons must lie in [0, 150)", "got 150"]),
        (["--neurons", "3,3"], ["--neurons must be distinct", "'3,3'"]),
        (["--neurons", "a"], ["--neurons must be comma-separated neuron ids", "'a'"]),
        (["--budget", "0"], ["--budget", "0"]),
        (["--part", "weights"], ["--part", "'weights'"]),
        (["--baselines", "random,half"], ["--baselines", "'half'"]),
        (["--d", "0"], ["--d", "0"]),
        (["--synthesized-share", "1"], ["--synthesized-share", "1"]),
        (["--synthesized", "-1"], ["--synthesized", "-1"]),
        (["--learning-rate", "nan"], ["--learning-rate", "nan"]),
        (["--method", "nope"], ["--method", "nope"]),
        (["--dataset", "fashion-mnist"], ["trained on input shape (8, 8, 1)", "(28, 28, 1)"]),
        (["--dataset", "npz:{tmp}/one.npz"], ["at least 2 training inputs", "has 1"]),
        (["--dataset", "npz:{tmp}/nan.npz"], ["finite"]),
    ],
)
def test_bad_input_is_exit_2_and_writes_nothing(
    capsys, tmp_path, weak_checkpoint, extra, fragments
):
    _npz(tmp_path / "one.npz", n_train=1)
    _npz(tmp_path / "nan.npz", n_train=30, nan=True)
    before = _digest(weak_checkpoint)
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = tmp_path / "rep"
    code, stdout, err = run_cli(capsys, "repair", "--checkpoint", str(weak_checkpoint),
                                "--out", str(out), "--no-progress", *extra)  # fmt: skip
    assert_usage_error(code, stdout, err, *fragments)
    assert not out.exists()
    assert _digest(weak_checkpoint) == before


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_out_never_holds_the_input_checkpoint(capsys, tmp_path, weak_checkpoint, where):
    copy = tmp_path / "ck" / "model"
    copy.parent.mkdir()
    shutil.copytree(weak_checkpoint, copy)
    before = _digest(copy)
    out = {"same": copy, "inside": copy / "rep", "parent": copy.parent}[where]
    code, stdout, err = run_cli(capsys, "repair", "--checkpoint", str(copy), "--out", str(out),
                                "--no-progress")  # fmt: skip
    assert_usage_error(code, stdout, err, "--out must lie apart from the input checkpoint")
    assert _digest(copy) == before
    assert not (copy / "rep").exists()


def test_a_repair_that_cannot_help_keeps_the_original_and_says_so(capsys, tmp_path):
    """A well-trained digits model is right on every validation input: the checkpoint holds
    the original parameters and both outputs say so."""
    ck = tmp_path / "good"
    assert cli.main(["train", "--model", "mlp-3x50", "--out", str(ck), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "rep"
    code, text, err = run_cli(capsys, "repair", "--checkpoint", str(ck), "--k", "3",
                              "--baselines", "output", "--budget", "30", "--out", str(out),
                              "--no-progress")  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "repair.json").read_text())
    assert result["results"]["targeted"]["validation_before"] == 1.0
    assert result["kept_original"] and result["results"]["targeted"]["changed"] == 0
    assert "the original parameters were kept" in text
    _, original, _ = checkpoints.load_checkpoint(ck)
    _, kept, _ = checkpoints.load_checkpoint(out / "checkpoint")
    a, b = _leaves(original), _leaves(kept)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_search_runs_beside_the_gradient_repair_on_the_same_budget(
    capsys, tmp_path, weak_checkpoint
):
    out = tmp_path / "rep"
    code, text, err = run_cli(capsys, "repair", "--checkpoint", str(weak_checkpoint),
                              "--neurons", "5,60", "--baselines", "output", "--budget", "25",
                              "--search", "--out", str(out), "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    rows = json.loads(text)["results"]
    assert set(rows) == {"targeted", "search", "output"}
    assert rows["search"]["neurons"] == rows["targeted"]["neurons"] == [5, 60]
    # the search moves the 64 weights of the same neurons with the largest fitness gradient
    assert rows["search"]["trained"] == min(64, rows["targeted"]["trained"])
    assert rows["search"]["steps"] <= 25 and rows["search"]["changed"] <= rows["search"]["trained"]
    assert "| targeted, search (DE) |" in (out / "repair.md").read_text()


def test_synthesized_inputs_join_the_repair_data_and_measure_apart(
    capsys, tmp_path, weak_checkpoint
):
    out = tmp_path / "rep"
    code, text, err = run_cli(capsys, "repair", "--checkpoint", str(weak_checkpoint), "--k", "4",
                              "--synthesized", "20", "--synthesized-share", "0.5",
                              "--baselines", "output", "--budget", "20", "--out", str(out),
                              "--json", "--no-progress")  # fmt: skip
    assert code == 0, err
    result = json.loads(text)
    d = result["dataset"]
    n_train = 1348  # digits: 1,348 training inputs; validation: the last half at most
    v = min(5000, n_train // 2)
    times = round(0.5 * (n_train - v) / (0.5 * 20))  # repeated to half the repair data
    assert d["repair_inputs"] == n_train - v + 20 * times
    assert d["validation_inputs"] == v + 20 and d["synthesized_test_inputs"] == 20
    for row in (result["results"]["targeted"], result["results"]["output"]):
        assert 0 <= row["synthesized_before"] <= 1 and 0 <= row["synthesized_after"] <= 1
    assert "synth. before" in (out / "repair.md").read_text()
