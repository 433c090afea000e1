"""Checkpoints under several processes: two processes over 127.0.0.1 (gloo CPU collectives)
load, use and save checkpoints as one process does; a damaged checkpoint names its failure."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_identical

from deepfault_jax import checkpoints, probe, spectrum_io, streaming, training, zoo
from deepfault_jax.errors import InputError

WORKER = Path(__file__).with_name("multiprocess_checkpoint_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _assert_same_tree(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_processes(work: Path, *, timeout_s: float = 300) -> None:
    """Runs the worker as 2 processes over 127.0.0.1; fails with both processes' output."""
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # the worker sets its own device count
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(pid), "2", str(port), str(work)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for pid in range(2)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout_s))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate() for proc in procs]
        pytest.fail("the two processes did not finish in time:\n" + _logs(procs, outputs))
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f"exit codes {codes}:\n" + _logs(procs, outputs)


def _logs(procs, outputs) -> str:
    return "\n".join(
        f"--- process {pid} (exit {proc.returncode})\nstdout:\n{out}\nstderr:\n{err[-6000:]}"
        for pid, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True))
    )


def test_two_processes_load_use_and_save_checkpoints(tmp_path, digits):
    model = zoo.create_model("lenet1", input_shape=digits.input_shape, num_classes=10)
    params = training.train(jax.random.key(3), model, digits, epochs=1).params
    checkpoints.save_checkpoint(tmp_path / "original", model, params)
    cached = tmp_path / "cache" / "models" / "lenet1-relu-digits-seed0"
    checkpoints.save_checkpoint(cached, model, params, metadata={"dataset": "digits"})

    _run_two_processes(tmp_path)

    # the spectrum of the two processes is the one of a single process, bit for bit
    one = streaming.compute_spectrum(
        probe.model_probe(model, params), params, digits.x_test, digits.y_test, batch_size=32
    )
    two = spectrum_io.load_spectrum(tmp_path / "spectrum.npz")
    assert int(np.asarray(two.n_fail).sum()) > 0  # a spectrum with both outcomes
    assert_identical(one, two)
    # the checkpoint the two processes saved loads in one process, with the same parameters
    _, again, meta = checkpoints.load_checkpoint(tmp_path / "saved", model="lenet1")
    _assert_same_tree(params, again)
    assert meta["by"] == 2
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["model.json", "params"]
    # a missing cached model: process 0 trained it once, both loaded that one
    models = tmp_path / "fresh-cache" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["lenet1-relu-digits-seed0"]
    trained = checkpoints.load_checkpoint(models / "lenet1-relu-digits-seed0")[2]
    assert trained["epochs"] == zoo.default_epochs(digits)
    digests = [(tmp_path / f"trained-{pid}.txt").read_text() for pid in range(2)]
    assert digests == [trained["params_digest"]] * 2


# --------------------------------------------------------------------------- damaged checkpoints


def _save(path: Path) -> None:
    model = zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10)
    checkpoints.save_checkpoint(path, model, zoo.init_params(jax.random.key(0), model))


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda params: (params / "_METADATA").write_bytes(b"{"), id="tree metadata cut"
        ),
        pytest.param(lambda params: _remove(params / "ocdbt.process_0"), id="array index removed"),
        pytest.param(lambda params: _remove(params / "manifest.ocdbt"), id="manifest removed"),
        pytest.param(lambda params: _remove(params / "d"), id="array data removed"),
    ],
)
def test_a_damaged_checkpoint_names_the_failure_not_the_architecture(tmp_path, damage):
    out = tmp_path / "ck"
    _save(out)
    damage(out / "params")
    with pytest.raises(InputError) as info:
        checkpoints.load_checkpoint(out)
    message = str(info.value)
    assert f"restoring the parameters from {out / 'params'} failed (" in message, message
    assert re.search(r"failed \(\w+(Error|Exception)?: ", message), message  # orbax's reason
    assert "do not fit" not in message, message


def test_parameters_of_another_architecture_still_do_not_fit(tmp_path):
    """Blaming the architecture is kept for the case where orbax's metadata shows other shapes."""
    out = tmp_path / "ck"
    _save(out)
    meta_path = out / "model.json"
    meta_path.write_text(meta_path.read_text().replace('"lenet1"', '"lenet4"'))
    with pytest.raises(InputError, match=r"parameters do not fit lenet4 with input \(8, 8, 1\)"):
        checkpoints.load_checkpoint(out)
