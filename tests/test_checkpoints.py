"""Checkpoints: never replace what the package did not write; digests; strict metadata; corrupt files.

Everything here writes real orbax checkpoints of real Flax models.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from deepfault_jax import checkpoints, files, zoo
from deepfault_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def _model(name: str = "mlp-3x50") -> zoo.Model:
    return zoo.create_model(name, input_shape=(8, 8, 1), num_classes=10)


def _save(path: Path, seed: int = 0, name: str = "mlp-3x50"):
    model = _model(name)
    params = zoo.init_params(jax.random.key(seed), model)
    checkpoints.save_checkpoint(path, model, params)
    return params


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# --------------------------------------------------------------------------- 1. never delete what is not ours


def test_save_checkpoint_refuses_a_directory_holding_user_files(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    with pytest.raises(InputError, match=re.escape(str(out))) as info:
        _save(out)
    assert "was not written by deepfault-jax" in str(info.value)
    assert _snapshot(out) == {"notes.txt": b"my notes"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no temporary left


def test_save_checkpoint_refuses_a_project_directory_given_as_dot(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("# my project\n")
    (project / "src" / "main.py").write_text("print('hi')\n")
    before = _snapshot(project)
    monkeypatch.chdir(project)
    with pytest.raises(InputError, match=re.escape(str(project))):
        _save(Path("."))
    assert _snapshot(project) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_save_checkpoint_refuses_a_checkpoint_the_user_added_files_to(tmp_path):
    out = tmp_path / "ck"
    _save(out, seed=0)
    (out / "analysis.ipynb").write_text("{}")
    before = _snapshot(out)
    with pytest.raises(InputError, match=re.escape(str(out))):
        _save(out, seed=1)
    assert _snapshot(out) == before


def test_save_checkpoint_fills_an_empty_directory_and_replaces_its_own_checkpoint(tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    _save(out, seed=0)
    second = _save(out, seed=1)
    _assert_same_tree(second, checkpoints.load_checkpoint(out)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert checkpoints.is_checkpoint_dir(out)
    assert not checkpoints.is_checkpoint_dir(tmp_path)


def test_checkpoint_of_the_previous_version_is_recognised_and_replaced(tmp_path):
    """Checkpoints written before the digest existed carry the format marker all the same."""
    out = tmp_path / "ck"
    _save(out, seed=0)
    meta = json.loads((out / "model.json").read_text())
    old = {k: meta[k] for k in ("format", "format_version", "model", "input_shape",
                                "num_classes", "activation", "versions", "created")}  # fmt: skip
    (out / "model.json").write_text(json.dumps(old))
    second = _save(out, seed=1)
    _assert_same_tree(second, checkpoints.load_checkpoint(out)[1])


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path):
    out = tmp_path / "ck"
    first = _save(out, seed=0)
    before = _snapshot(out)
    unsavable = {"dense_0": {"kernel": object()}}  # orbax cannot write this: it fails midway
    with pytest.raises(Exception):  # noqa: B017 - orbax's own error type
        checkpoints.save_checkpoint(out, _model(), unsavable)
    assert _snapshot(out) == before
    _assert_same_tree(first, checkpoints.load_checkpoint(out)[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_replace_directory_swaps_in_what_fill_wrote(tmp_path):
    out = tmp_path / "out"

    def fill(tmp: Path) -> None:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        (tmp / "a.txt").write_text("new")

    assert files.replace_directory(out, fill, owned=lambda p: True) == out.absolute()
    assert _snapshot(out) == {"a.txt": b"new"}
    (out / "a.txt").write_text("old")
    files.replace_directory(out, fill, owned=lambda p: (p / "a.txt").is_file())
    assert _snapshot(out) == {"a.txt": b"new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_directory_keeps_the_old_directory_when_fill_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")

    def fill(tmp: Path) -> None:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        files.replace_directory(out, fill, owned=lambda p: True)
    assert _snapshot(out) == {"a.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_directory_refusals_name_the_path(tmp_path):
    calls = []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="must be a directory; got existing file") as info:
        files.replace_directory(a_file, calls.append, owned=lambda p: True)
    assert str(a_file) in str(info.value)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(InputError, match=rf"{re.escape(str(busy))}.*was not written by"):
        files.replace_directory(busy, calls.append, owned=lambda p: False)
    with pytest.raises(InputError, match=re.escape(str(busy))):
        files.check_replaceable(busy, owned=lambda p: False)
    link = tmp_path / "link"
    link.symlink_to(busy)
    with pytest.raises(InputError, match=rf"not a symbolic link; got {re.escape(repr(str(link)))}"):
        files.replace_directory(link, calls.append, owned=lambda p: True)
    assert link.is_symlink() and _snapshot(busy) == {"x": b"x"}
    assert calls == []  # refused before any work
    assert files.is_empty_dir(tmp_path / "new") is False
    (tmp_path / "empty").mkdir()
    assert files.is_empty_dir(tmp_path / "empty") and not files.is_empty_dir(busy)


def test_parameters_on_many_devices_load_on_one_device(tmp_path):
    """Checkpoints hold host arrays: parameters replicated or sharded over a mesh load back,
    on this process's first device, whatever the devices or processes that saved them."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    model = _model()
    params = zoo.init_params(jax.random.key(0), model)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    n = len(jax.devices())

    def place(leaf):
        spec = PartitionSpec("data") if leaf.shape[0] % n == 0 else PartitionSpec()
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    placed = jax.tree.map(place, params)
    assert any(not leaf.is_fully_replicated for leaf in jax.tree.leaves(placed))
    checkpoints.save_checkpoint(tmp_path / "ck", model, placed)
    _, restored, meta = checkpoints.load_checkpoint(tmp_path / "ck")
    _assert_same_tree(params, restored)
    checkpoints.save_checkpoint(tmp_path / "plain", model, params)
    assert (
        meta["params_digest"] == checkpoints.load_checkpoint(tmp_path / "plain")[2]["params_digest"]
    )
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# --------------------------------------------------------------------------- 2. parameter digest


def test_checkpoint_stores_a_parameter_digest(tmp_path):
    _save(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["format"] == "deepfault-jax-checkpoint"
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", meta["params_digest"])


@pytest.mark.parametrize("name", ["mlp-3x50", "nnx-mlp-3x50"])
def test_flipped_bytes_in_the_parameter_files_are_detected(tmp_path, name):
    out = tmp_path / "ck"
    _save(out, name=name)
    data = _largest_file(out / "params")  # the file holding the arrays' bytes
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 8] = bytes(b ^ 0xFF for b in raw[middle : middle + 8])
    data.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=rf"checkpoint {re.escape(str(out))} is corrupt"):
        checkpoints.load_checkpoint(out)


def test_an_edited_digest_is_detected(tmp_path):
    out = tmp_path / "ck"
    _save(out)
    meta = json.loads((out / "model.json").read_text())
    stored = meta["params_digest"]
    meta["params_digest"] = "sha256:" + "0" * 64
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(
        InputError,
        match=rf"is corrupt: parameter digest expected sha256:0{{64}}, got {stored}",
    ):
        checkpoints.load_checkpoint(out)


def test_checkpoint_without_a_digest_loads_with_a_warning(tmp_path):
    out = tmp_path / "ck"
    params = _save(out)
    meta = json.loads((out / "model.json").read_text())
    del meta["params_digest"]
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.warns(UserWarning, match="no parameter digest"):
        _, restored, _ = checkpoints.load_checkpoint(out)
    _assert_same_tree(params, restored)


def test_a_cached_checkpoint_without_a_digest_gets_one(tmp_path, digits):
    """The model cache is the package's own: an entry from before digests is upgraded once,
    silently, keeping its parameters and metadata; later loads are verified."""
    import warnings

    model, params, meta = checkpoints.load_or_train("mlp-3x50", digits, cache_dir=tmp_path)
    path = Path(meta["checkpoint"])
    old = json.loads((path / "model.json").read_text())
    del old["params_digest"]
    (path / "model.json").write_text(json.dumps(old))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning reaches the user
        _, again, meta2 = checkpoints.load_or_train("mlp-3x50", digits, cache_dir=tmp_path)
    _assert_same_tree(params, again)
    upgraded = json.loads((path / "model.json").read_text())
    assert upgraded["params_digest"] == checkpoints.load_checkpoint(path)[2]["params_digest"]
    for key in ("dataset", "seed", "epochs", "test_accuracy"):
        assert upgraded[key] == old[key] == meta2[key], key


# --------------------------------------------------------------------------- 3. strict model.json


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("input_shape", None),
        ("input_shape", "8,8,1"),
        ("input_shape", [8, 8]),
        ("input_shape", [8, -8, 1]),
        ("input_shape", {"h": 8}),
        ("model", None),
        ("model", ["mlp-3x50"]),
        ("model", "vgg"),
        ("num_classes", None),
        ("num_classes", "10"),
        ("num_classes", 1.5),
        ("activation", 3),
        ("params_digest", 5),
    ],
)
def test_bad_model_json_names_the_file_and_the_key(tmp_path, key, value):
    out = tmp_path / "ck"
    _save(out)
    meta = json.loads((out / "model.json").read_text())
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    (out / "model.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as info:
        checkpoints.load_checkpoint(out)
    message = str(info.value)
    assert str(out / "model.json") in message and repr(key) in message, message


def test_model_json_that_is_not_an_object(tmp_path):
    out = tmp_path / "ck"
    _save(out)
    (out / "model.json").write_text(json.dumps(["deepfault-jax-checkpoint"]))
    with pytest.raises(InputError, match=re.escape(str(out / "model.json"))):
        checkpoints.load_checkpoint(out)


# --------------------------------------------------------------------------- 4. corrupt parameters

_CORRUPTIONS = {
    "truncated": lambda params: _largest_file(params).write_bytes(b"\0" * 100),
    "data deleted": lambda params: shutil.rmtree(_largest_file(params).parent),
    "garbage instead of params": lambda params: (shutil.rmtree(params), params.write_bytes(b"xx")),
    "manifest garbage": lambda params: (params / "manifest.ocdbt").write_bytes(b"junk"),
    "params missing": shutil.rmtree,
}

_LOAD_EACH = textwrap.dedent(
    """
    import gc, json, sys, time
    from deepfault_jax import checkpoints
    from deepfault_jax.errors import InputError
    out = {}
    for path in sys.argv[1:]:
        try:
            checkpoints.load_checkpoint(path)
            out[path] = ["loaded", ""]
        except Exception as e:
            out[path] = [type(e).__name__, str(e), isinstance(e, InputError)]
    gc.collect()
    time.sleep(1.0)  # time for stray reports from background threads to show
    gc.collect()
    print(json.dumps(out))
    """
)


def test_corrupt_parameters_are_one_clean_input_error(tmp_path):
    paths = {}
    for i, (label, corrupt) in enumerate(_CORRUPTIONS.items()):
        path = tmp_path / f"ck{i}"
        _save(path)
        corrupt(path / "params")
        paths[str(path)] = label
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_EACH, *paths],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for path, label in paths.items():
        kind, message, is_input_error = results[path]
        assert is_input_error, f"{label}: {kind}: {message}"
        assert f"restoring the parameters from {path}/params failed (" in message, (label, message)
        assert "do not fit" not in message, (label, message)
    for noise in ("Traceback", "Exception ignored", "absl", "Event loop"):
        assert noise not in done.stderr, done.stderr
