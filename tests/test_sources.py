"""Streamed data sets (deepfault_jax.sources) and streamed spectra (stream_spectrum).

Every source is checked against the in-memory loader of the same files, every
streamed spectrum against the in-memory spectrum bit for bit; failures are real
ones (a truncated gzip file, a compressed npz), never stand-ins.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import assert_identical

from deepfault_jax import data, probe, sources, spectrum_io, streaming, zoo
from deepfault_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def write_idx(path: Path, a: np.ndarray, *, packed: bool) -> None:
    """``a`` (uint8) as an IDX file, gzip-compressed or not."""
    raw = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape)
    raw += np.ascontiguousarray(a, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw, mtime=0) if packed else raw)


def idx_dir(tmp: Path, x_train, y_train, x_test, y_test, *, packed: bool) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if packed else ""
    for name, a in (("train-images-idx3-ubyte", x_train), ("train-labels-idx1-ubyte", y_train),
                    ("t10k-images-idx3-ubyte", x_test), ("t10k-labels-idx1-ubyte", y_test)):  # fmt: skip
        write_idx(tmp / (name + ext), a, packed=packed)
    return tmp


@pytest.fixture(scope="module")
def digits_u8(digits):
    """The digits split as uint8 pixels (0..255), so that idx files hold them exactly."""
    to8 = lambda x: np.round(x[..., 0] * 255).astype(np.uint8)  # noqa: E731
    return to8(digits.x_train), digits.y_train.astype(np.uint8), to8(digits.x_test), digits.y_test.astype(np.uint8)  # fmt: skip


@pytest.fixture(scope="module")
def tiled_u8(digits_u8):
    """digits with the test split repeated 14 times (6,286 rows), each copy's pixels
    shifted (so that gzip cannot fold the copies together): failures beyond the 4,096
    rows a resume identity samples."""
    x_train, y_train, x_test, y_test = digits_u8
    tiles = [((x_test.astype(np.int64) + 17 * k) % 256).astype(np.uint8) for k in range(14)]
    return x_train, y_train, np.concatenate(tiles), np.tile(y_test, 14)


@pytest.fixture(scope="module")
def mlp(digits):
    model = zoo.create_model("mlp-3x50", input_shape=digits.input_shape, num_classes=10)
    params = zoo.init_params(jax.random.key(3), model)
    return probe.model_probe(model, params), params


def read_all(src: sources.Source, step: int = 97):
    parts = [src.read(i, min(len(src), i + step)) for i in range(0, len(src), step)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.parametrize("packed", [False, True])
def test_idx_source_equals_the_loader(tmp_path, digits_u8, packed):
    d = idx_dir(tmp_path / "idx", *digits_u8, packed=packed)
    ds = data.load_dataset(f"idx:{d}")
    for split in ("train", "test"):
        src = sources.open_source(f"idx:{d}", split=split)
        x, y = read_all(src)
        np.testing.assert_array_equal(x, ds.split(split)[0])
        np.testing.assert_array_equal(y, ds.split(split)[1])
        assert src.num_classes == ds.num_classes and src.input_shape == ds.input_shape
    if not packed:  # memory-mapped, not read
        assert isinstance(sources.open_source(f"idx:{d}")._x, np.memmap)


def test_npz_and_npy_sources_are_memory_mapped(tmp_path, digits):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=digits.x_train, y_train=digits.y_train, x_test=digits.x_test,
             y_test=digits.y_test, num_classes=np.int64(10))  # fmt: skip
    src = sources.open_source(f"npz:{path}")
    assert isinstance(src._x, np.memmap) and src.num_classes == 10
    x, y = read_all(src)
    np.testing.assert_array_equal(x, digits.x_test)
    np.testing.assert_array_equal(y, digits.y_test)
    d = tmp_path / "npy"
    d.mkdir()
    np.save(d / "x_test.npy", (digits.x_test * 255).round().astype(np.uint8))
    np.save(d / "y_test.npy", digits.y_test.astype(np.int64))
    src = sources.open_source(f"npy:{d}")
    assert isinstance(src._x, np.memmap) and src.input_shape == (8, 8, 1)
    x, y = read_all(src)
    np.testing.assert_allclose(x, digits.x_test, atol=0.5 / 255)
    np.testing.assert_array_equal(y, digits.y_test)


def test_class_count_comes_from_both_splits_as_the_loader(tmp_path, digits):
    """Without num_classes, the classes are the largest label of train and test + 1."""
    keep = digits.y_test < 9  # no class 9 in the test split
    path = tmp_path / "d.npz"
    np.savez(path, x_train=digits.x_train, y_train=digits.y_train,
             x_test=digits.x_test[keep], y_test=digits.y_test[keep])  # fmt: skip
    assert sources.open_source(f"npz:{path}").num_classes == 10
    assert data.load_dataset(f"npz:{path}").num_classes == 10
    d = tmp_path / "npy"
    d.mkdir()
    for name, a in (("x_train", digits.x_train), ("y_train", digits.y_train),
                    ("x_test", digits.x_test[keep]), ("y_test", digits.y_test[keep])):  # fmt: skip
        np.save(d / f"{name}.npy", a)
    assert sources.open_source(f"npy:{d}").num_classes == 10


def test_compressed_npz_is_refused_with_the_way_out(tmp_path, digits):
    path = tmp_path / "c.npz"
    np.savez_compressed(path, x_train=digits.x_train, y_train=digits.y_train,
                        x_test=digits.x_test, y_test=digits.y_test)  # fmt: skip
    with pytest.raises(InputError, match="compressed.*np.savez"):
        sources.open_source(f"npz:{path}")


def test_tfds_source_reads_a_prepared_data_set(prepared_tfds_dir, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(prepared_tfds_dir))
    ds = data.load_dataset("tfds:tiny_shapes")
    src = sources.open_source("tfds:tiny_shapes")
    assert (len(src), src.num_classes, src.input_shape) == (9, 3, (8, 8, 1))
    x, y = read_all(src, step=4)
    np.testing.assert_array_equal(x, ds.x_test)
    np.testing.assert_array_equal(y, ds.y_test)


def test_tfds_not_prepared_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(
        InputError, match="not prepared.*tfds build mnist --file_format=array_record"
    ):
        sources.open_source("tfds:mnist")


def test_bad_specs_and_rows(tmp_path):
    with pytest.raises(InputError, match="unknown data set 'zip:x' for streaming; expected one of"):
        sources.open_source("zip:x")
    with pytest.raises(InputError, match="npy:DIR needs x_test.npy"):
        sources.open_source(f"npy:{tmp_path}")
    src = sources.open_source("digits")
    with pytest.raises(
        InputError, match=r"rows \[start, stop\) must lie within its 449 rows; got \[440, 460\)"
    ):
        src.read(440, 460)


@pytest.mark.parametrize("batch_size", [1, 64, 449, 4096])
def test_streamed_spectrum_equals_the_in_memory_one(mlp, digits, batch_size):
    prb, params = mlp
    ref = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=100)
    got = streaming.stream_spectrum(
        prb, params, sources.open_source("digits"), batch_size=batch_size
    )
    assert_identical(ref, got)


@pytest.mark.parametrize("devices", [2, 8])
def test_streamed_spectrum_over_a_mesh_equals_the_in_memory_one(mlp, digits, devices):
    """Batches sharded over several local devices: the counts of one device, and the
    in-memory run's attribution sums over the same mesh bit for bit (float sums
    over other meshes differ in the last place: test_attribution.py)."""
    prb, params = mlp
    mesh = streaming.data_mesh(devices=devices)
    one = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=64)
    ref = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=64,
                                     attribution=True, mesh=mesh)  # fmt: skip
    got = streaming.stream_spectrum(prb, params, sources.open_source("digits"), batch_size=64,
                                    attribution=True, mesh=mesh)  # fmt: skip
    assert_identical(one, got)
    assert_identical(ref, got)
    for f in ("act_pass", "gxa_pass", "gxa_fail", "fixes", "breaks"):
        np.testing.assert_array_equal(getattr(ref.attribution, f), getattr(got.attribution, f))


def test_streamed_attribution_equals_the_in_memory_one(mlp, digits):
    prb, params = mlp
    ref = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=64,
                                     attribution=True)  # fmt: skip
    got = streaming.stream_spectrum(prb, params, sources.open_source("digits"), batch_size=64,
                                    attribution=True)  # fmt: skip
    assert_identical(ref, got)
    for f in ("act_pass", "gxa_pass", "gxa_fail", "fixes", "breaks"):
        np.testing.assert_array_equal(getattr(ref.attribution, f), getattr(got.attribution, f))


def test_streamed_run_resumes_with_another_batch_size(mlp, digits, tmp_path):
    prb, params = mlp
    ref = streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test)
    path, src = tmp_path / "run.npz", sources.open_source("digits")

    class Stop(Exception):
        pass

    def stop(done, _):
        if done == 5:
            raise Stop

    with pytest.raises(Stop):
        streaming.stream_spectrum(prb, params, src, batch_size=30, checkpoint_path=path,
                                  checkpoint_every=2, callback=stop)  # fmt: skip
    _, meta = spectrum_io.load_spectrum(path, with_metadata=True)
    assert meta["history"] == [[0, 0], [60, 60], [120, 120]] and meta["complete"] is False
    got = streaming.stream_spectrum(prb, params, src, batch_size=17, checkpoint_path=path)
    assert_identical(ref, got)
    _, meta = spectrum_io.load_spectrum(path, with_metadata=True)
    assert meta["complete"] is True and meta["history"][-1] == [449, 449]
    other = zoo.init_params(jax.random.key(4), zoo.create_model("mlp-3x50", input_shape=(8, 8, 1), num_classes=10))  # fmt: skip
    with pytest.raises(InputError, match="other parameters"):
        streaming.stream_spectrum(prb, other, src, checkpoint_path=path)


def test_a_failed_read_saves_the_position_and_resumes(mlp, tiled_u8, tmp_path):
    """A gzip file cut short fails mid-stream; with the file whole again the run resumes."""
    prb, params = mlp
    d = idx_dir(tmp_path / "idx", *tiled_u8, packed=True)
    ds = data.load_dataset(f"idx:{d}")
    ref = streaming.compute_spectrum(prb, params, ds.x_test, ds.y_test)
    images = d / "t10k-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    raw = gzip.decompress(whole)
    images.write_bytes(gzip.compress(raw, mtime=0)[: len(whole) * 3 // 4])  # a cut download
    path = tmp_path / "run.npz"
    src = sources.open_source(f"idx:{d}")
    with pytest.raises(InputError, match=r"reading idx:.* failed after row (\d+): .*saved in") as e:
        streaming.stream_spectrum(prb, params, src, batch_size=200, checkpoint_path=path,
                                  checkpoint_every=1000)  # fmt: skip
    saved, meta = spectrum_io.load_spectrum(path, with_metadata=True)
    at = meta["history"][-1][1]
    assert 4096 < at < 6286 and saved.num_inputs == at and f"after row {at}" in str(e.value)
    images.write_bytes(whole)
    got = streaming.stream_spectrum(prb, params, sources.open_source(f"idx:{d}"), batch_size=64,
                                    checkpoint_path=path)  # fmt: skip
    assert_identical(ref, got)


def test_class_count_and_shape_mismatch_are_named(mlp, tmp_path, digits):
    prb, params = mlp
    path = tmp_path / "three.npz"
    np.savez(path, x_train=digits.x_train, y_train=digits.y_train % 3, x_test=digits.x_test,
             y_test=digits.y_test % 3)  # fmt: skip
    with pytest.raises(InputError, match=r"has 3 classes; the model has 10 logits"):
        streaming.stream_spectrum(prb, params, sources.open_source(f"npz:{path}"))
    np.savez(path, x_train=digits.x_train, y_train=digits.y_train, x_test=np.zeros((5, 4, 4)),
             y_test=np.arange(5) % 2 + 8)  # fmt: skip
    with pytest.raises(
        InputError, match=r"images of shape \(4, 4, 1\); the model expects \(8, 8, 1\)"
    ):
        streaming.stream_spectrum(prb, params, sources.open_source(f"npz:{path}"))


# --------------------------------------------------------------------------- two processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(args: list[str], *, kill_after_first: bool = False, timeout: float = 240):
    """Runs stream_worker.py as processes 0 and 1; returns their (returncode, stderr).

    With ``kill_after_first``, once one process has exited the other is given a
    few seconds and then killed (it waits on a collective with a dead peer)."""
    port = free_port()
    worker = Path(__file__).with_name("stream_worker.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(worker), str(i), "2", str(port), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for i in range(2)]  # fmt: skip
    try:
        if kill_after_first:
            import time

            deadline = time.monotonic() + timeout
            while all(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(3)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
        out = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, o[1]) for p, o in zip(procs, out, strict=True)]


@pytest.mark.slow
def test_two_processes_killed_and_failed_resume_bit_identically(tmp_path, tiled_u8, mlp):
    """Two processes over 127.0.0.1 stream an idx set: (1) both are killed mid-run,
    (2) a restart fails mid-stream in process 1 on a cut file while process 0 is
    killed, (3) with the file whole, a restart finishes: the spectrum equals one
    process's, bit for bit, and process 1's files show it was ahead of process 0."""
    d = idx_dir(tmp_path / "idx", *tiled_u8, packed=True)
    ds = data.load_dataset(f"idx:{d}")
    prb, params = mlp
    ref = streaming.compute_spectrum(prb, params, ds.x_test, ds.y_test)
    ckpt, out = tmp_path / "run.npz", tmp_path / "spectrum.npz"
    common = [f"idx:{d}", str(ckpt), str(out)]
    # (1) both processes kill themselves after batch 4 (saved at 3)
    res = run_pair([*common, "--die-at", "4"])
    assert [r[0] for r in res] == [-signal.SIGKILL] * 2, res
    files = [tmp_path / f"run.process-{i}-of-2.npz" for i in range(2)]
    metas = [spectrum_io.load_spectrum(f, with_metadata=True)[1] for f in files]
    assert [m["history"][-1][0] for m in metas] == [3 * 2 * 8] * 2, metas
    # (2) cut the images: process 1 (rows 3143..6285) fails; process 0 is killed
    images = d / "t10k-images-idx3-ubyte.gz"
    whole = images.read_bytes()
    images.write_bytes(whole[: len(whole) * 9 // 10])
    res = run_pair([*common, "--every", "50"], kill_after_first=True)
    assert res[1][0] == 3 and "failed after row" in res[1][1], res
    h0, h1 = (spectrum_io.load_spectrum(f, with_metadata=True)[1]["history"] for f in files)
    assert h1[-1][0] > h0[-1][0], (h0, h1)  # process 1 saved at its failure, beyond process 0
    # (3) whole again: both continue from process 0's point (process 1 drops its later one)
    images.write_bytes(whole)
    res = run_pair([*common, "--batch-size", "6"])
    assert [r[0] for r in res] == [0, 0], res
    assert_identical(ref, spectrum_io.load_spectrum(out))
    n0, n1 = (spectrum_io.load_spectrum(f, with_metadata=True)[1]["history"] for f in files)
    kept = [h for h in h1 if h[0] <= h0[-1][0]]
    assert n0[: len(h0)] == h0 and n1[: len(kept)] == kept, json.dumps([h0, h1, n0, n1])
    assert n1[len(kept)][0] == h0[-1][0] + 3 * 6 * 2  # the next save: 3 batches of 6 rows x 2
    assert n0[-1] == [6286, 3143] and n1[-1] == [6286, 6286]


# --------------------------------------------------------------------------- the command line


def test_cli_stream_equals_the_in_memory_spectrum(tmp_path, digits, capsys):
    """`spectrum --stream` over a memory-mapped npz with a saved checkpoint (nothing
    loaded whole) writes the in-memory command's counts."""
    from deepfault_jax import checkpoints, cli

    model = zoo.create_model("lenet1", input_shape=(8, 8, 1), num_classes=10)
    ckpt = tmp_path / "ckpt"
    checkpoints.save_checkpoint(ckpt, model, zoo.init_params(jax.random.key(1), model))
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=digits.x_train, y_train=digits.y_train, x_test=digits.x_test,
             y_test=digits.y_test)  # fmt: skip
    outs = []
    for extra in ([], ["--stream", "--save-every", "2", "--batch-size", "40"]):
        out = tmp_path / f"s{len(outs)}.npz"
        code = cli.main(["spectrum", "--checkpoint", str(ckpt), "--dataset", f"npz:{npz}",
                         "--out", str(out), "--no-progress", "--json", *extra])  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["streamed"] == bool(extra)
        outs.append(spectrum_io.load_spectrum(out))
    assert_identical(*outs)
    assert not (tmp_path / "s1.partial.npz").exists()


def test_cli_stream_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    from deepfault_jax import cli

    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    for spec, fragment in (("tfds:mnist", "tfds build mnist --file_format=array_record"),
                           (f"npz:{tmp_path}/none.npz", "does not exist")):  # fmt: skip
        code = cli.main(["spectrum", "--model", "keras:/none.keras", "--dataset", spec, "--stream",
                         "--out", str(tmp_path / "s.npz"), "--no-progress"])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
        assert not (tmp_path / "s.npz").exists()


def test_cli_stream_with_a_zoo_model_loads_the_set_only_to_train(tmp_path, digits, capsys,
                                                                 monkeypatch):  # fmt: skip
    """`spectrum --stream --model ZOO`: the first run trains the model on the whole
    set (loaded once); a run with the model cached loads nothing whole, and both
    write the in-memory spectrum of the cached model."""
    from deepfault_jax import checkpoints, cli, commands

    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "npy"
    d.mkdir()
    for split in ("train", "test"):
        x, y = digits.split(split)
        np.save(d / f"x_{split}.npy", (x * 255).round().astype(np.uint8))
        np.save(d / f"y_{split}.npy", y)
    loads = []
    whole = commands._whole_dataset
    monkeypatch.setattr(commands, "_whole_dataset", lambda *a: loads.append(a) or whole(*a))
    outs = []
    for run in range(2):
        out = tmp_path / f"s{run}.npz"
        code = cli.main(["spectrum", "--stream", "--dataset", f"npy:{d}", "--model", "mlp-3x50",
                         "--out", str(out), "--no-progress", "--json"])  # fmt: skip
        report = json.loads(capsys.readouterr().out)
        assert code == 0 and report["streamed"] and report["num_inputs"] == len(digits.y_test)
        assert len(loads) == 1, (run, loads)  # trained on the whole set once, then cached
        outs.append(spectrum_io.load_spectrum(out))
    assert_identical(*outs)
    ds = whole(f"npy:{d}", 10)
    model, params, _ = checkpoints.load_or_train("mlp-3x50", ds)
    ref = streaming.compute_spectrum(probe.model_probe(model, params), params, ds.x_test, ds.y_test)
    assert_identical(outs[0], ref)


# --------------------------------------------------------------------------- damaged files


def test_damaged_array_files_are_named_when_opened(tmp_path, digits_u8):
    x_tr, y_tr, x_te, y_te = digits_u8
    cases = {
        "label0d": (dict(y_test=np.array(3)), r"labels must be a 1-D integer array; got a int64 array of shape \(\)"),
        "nc_vec": (dict(num_classes=np.array([10, 10])), r"num_classes must be a scalar \(shape \(\)\); got shape \(2,\)"),
        "nc_float": (dict(num_classes=np.array(10.7)), r"num_classes must be an integer; got np.float64\(10.7\)"),
    }  # fmt: skip
    for name, (change, message) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(
            path, **{"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te, **change}
        )
        with pytest.raises(InputError, match=message):
            sources.open_source(f"npz:{path}")
    npy = tmp_path / "npy"
    npy.mkdir()
    for k, a in (("x_test", x_te), ("y_test", y_te), ("num_classes", np.array(10.5))):
        np.save(npy / f"{k}.npy", a)
    with pytest.raises(
        InputError,
        match=r"^\S*num_classes.npy: num_classes must be an integer; got np.float64\(10.5\)",
    ):
        sources.open_source(f"npy:{npy}")
    with pytest.raises(InputError, match="npz:PATH must name a file; got .*, which is a directory"):
        sources.open_source(f"npz:{npy}")


def test_damaged_idx_files_are_refused_before_or_at_their_end(tmp_path, digits_u8, mlp):
    """Uncompressed: a cut or overlong file and empty labels are refused when opened. Gzip
    (read forward in chunks): trailing bytes and a bad CRC fail at the last row."""
    prb, params = mlp
    d = idx_dir(tmp_path / "plain", *digits_u8, packed=False)
    images = d / "t10k-images-idx3-ubyte"
    whole = images.read_bytes()
    for data_, state in ((whole[:-100], "truncated"), (whole + bytes(1000), "oversized")):
        images.write_bytes(data_)
        with pytest.raises(InputError, match=rf"{state} IDX data: dimensions \[449, 8, 8\] need 28736 bytes"):  # fmt: skip
            sources.open_source(f"idx:{d}")
    images.write_bytes(whole)
    write_idx(d / "t10k-labels-idx1-ubyte", np.zeros(0, np.uint8), packed=False)
    with pytest.raises(InputError, match="the labels of test must hold at least one row; got 0"):
        sources.open_source(f"idx:{d}")
    g = idx_dir(tmp_path / "gz", *digits_u8, packed=True)
    images = g / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    bad_crc = bytearray(gzip.compress(raw, mtime=0))
    bad_crc[-8] ^= 0xFF  # the CRC32 in the gzip trailer
    for data_, reason in ((gzip.compress(raw + bytes(64), mtime=0), "oversized IDX data: more bytes after its 449 rows"),
                          (bytes(bad_crc), "CRC check failed")):  # fmt: skip
        images.write_bytes(data_)
        with pytest.raises(InputError, match=rf"failed after row \d+: .*{reason}"):
            streaming.stream_spectrum(prb, params, sources.open_source(f"idx:{g}"), batch_size=64)


def _interrupt_at_2(done, _):
    if done == 2:
        raise KeyboardInterrupt


def test_resume_files_of_another_kind_of_run_are_named(mlp, digits, tmp_path):
    prb, params = mlp
    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):  # a streamed run interrupted after its first save
        streaming.stream_spectrum(prb, params, sources.open_source("digits"), batch_size=64,
                                  checkpoint_path=path, checkpoint_every=1,
                                  callback=_interrupt_at_2)  # fmt: skip
    assert path.exists()
    with pytest.raises(InputError, match=r"it is the progress file of a streamed run \(stream_spectrum; spectrum --stream\); resume it that way"):  # fmt: skip
        streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, checkpoint_path=path)
    with pytest.raises(InputError, match=r"classes \[0, 1\]"):
        streaming.stream_spectrum(prb, params, sources.open_source("digits"), batch_size=64,
                                  checkpoint_path=path, classes=[0, 1])  # fmt: skip
    path.unlink()
    with pytest.raises(KeyboardInterrupt):
        streaming.compute_spectrum(prb, params, digits.x_test, digits.y_test, batch_size=64,
                                   checkpoint_path=path, checkpoint_every=1,
                                   callback=_interrupt_at_2)  # fmt: skip
    with pytest.raises(
        InputError,
        match=r"a run over data in memory \(compute_spectrum; spectrum without --stream\)",
    ):
        streaming.stream_spectrum(prb, params, sources.open_source("digits"), checkpoint_path=path)


def test_bad_arguments_of_the_streaming_api(mlp):
    prb, params = mlp
    src = sources.open_source("digits")
    for start, stop in ((0.5, 3), ("a", 3), (None, None)):
        with pytest.raises(InputError, match="start must be an integer"):
            src.read(start, stop)
    for option in ({"threads": 0}, {"threads": True}, {"prefetch": -1}, {"prefetch": 1.5},
                   {"checkpoint_path": 5}, {"checkpoint_path": ""}, {"callback": 5},
                   {"progress": "bar"}):  # fmt: skip
        with pytest.raises(InputError, match=f"{next(iter(option))} must"):
            streaming.stream_spectrum(prb, params, src, **option)
        if next(iter(option)) not in ("threads", "prefetch"):  # the in-memory run alike
            with pytest.raises(InputError, match=f"{next(iter(option))} must"):
                streaming.compute_spectrum(prb, params, *data.load_dataset("digits").split("test"), **option)  # fmt: skip
    with pytest.raises(InputError, match="probe must be a deepfault_jax Probe; got NoneType"):
        streaming.stream_spectrum(None, params, src)
    for args, kw, message in (((0, 1, 1), {}, "num_classes must lie in"),
                              ((10, -5, 1), {}, "num_neurons must lie in"),
                              ((10, 5, 1.5), {}, "batch_size must be an integer"),
                              ((10, 5, 1), {"attribution": "bogus"}, "attribution must be")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            streaming.memory_estimate(*args, **kw)
    # a batch larger than the data is counted as the data's size (as in memory)
    got = streaming.stream_spectrum(prb, params, src, batch_size=10**8)
    assert got.num_inputs == len(src)


def test_unprepared_tfds_is_one_line_and_unwritable_output_is_named(tmp_path):
    """Run as a user runs it: absl's warnings would reach the terminal."""
    from deepfault_jax import files

    env = {**os.environ, "TFDS_DATA_DIR": str(tmp_path / "tfds"), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "deepfault_jax.cli", "spectrum", "--stream",
                           "--dataset", "tfds:mnist", "--model", "keras:/none.keras",
                           "--out", str(tmp_path / "s.npz"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "is not prepared in" in err[0], done.stderr
    assert "tfds build mnist --file_format=array_record" in err[0]
    assert not (tmp_path / "s.npz").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(InputError, match=f"cannot write '{blocker / 's.npz'}'"):
        files.write_atomic(blocker / "s.npz", b"counts")
    assert blocker.read_text() == "not a directory"


def test_stored_class_counts_and_empty_splits_read_as_in_memory(tmp_path, digits_u8, mlp):
    """An integral float num_classes is read as load_dataset reads it; a split of no
    rows gives the empty spectrum in memory, as it did before memory was checked."""
    x_tr, y_tr, x_te, y_te = digits_u8
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, num_classes=np.array(12.0))
    assert sources.open_source(f"npz:{path}").num_classes == 12
    assert data.load_dataset(f"npz:{path}").num_classes == 12
    prb, params = mlp
    empty = streaming.compute_spectrum(prb, params, np.zeros((0, 8, 8, 1), np.float32),
                                       np.zeros(0, np.int32))  # fmt: skip
    assert empty.num_inputs == 0 and int(empty.a_pass.sum()) == 0
