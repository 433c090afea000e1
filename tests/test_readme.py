"""The README's promises: its Python example runs, its quickstart is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_is_two_commands_and_ci_runs_the_test_command():
    block = README[README.index("## Quickstart") :]
    commands = re.search(r"```bash\n(.*?)```", block, re.S).group(1).strip().splitlines()
    assert commands == ["deepfault-jax run", "python -m pytest"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\npython -m pytest\n" in ci and "dataset-fashion-mnist" in ci


def test_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))
    block = README[README.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["result"].test_accuracy > 0.9
    assert namespace["report"].results and (tmp_path / "runs" / "lenet5" / "report.md").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "runs"]  # nothing in the cwd


def test_python_examples_use_only_the_public_api():
    """Every name the README's Python reaches is ``deepfault_jax.NAME`` from ``__all__``."""
    import deepfault_jax

    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks
    for code in blocks:
        assert "from deepfault_jax" not in code, "import the package, not its modules"
        used = set(re.findall(r"\bdj\.(\w+)", code))
        assert used and used <= set(deepfault_jax.__all__), used - set(deepfault_jax.__all__)


def test_example_script_runs(tmp_path):
    """examples/train_with_spectrum.py runs to the end as a user would run it."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "DEEPFAULT_JAX_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_with_spectrum.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip(), "the example prints its result"


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start : end if end > 0 else None]


def test_bring_your_own_model_examples_run(tmp_path, monkeypatch):
    """Every block of "Bring your own model", in order, as a user runs them: the factory file
    written, the Python executed, each command through the CLI with exit 0."""
    import shlex
    import sys

    import numpy as np
    import pytest

    from deepfault_jax import cli, keras_models
    from deepfault_jax.errors import InputError

    try:
        keras = keras_models.require_keras()  # sets the JAX backend before keras is imported
    except InputError as e:
        pytest.skip(str(e))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DEEPFAULT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path))
    # what the user brings: a model in DeepFault's style (Dense without bias, then LeakyReLU,
    # softmax output) saved as .h5, and weights in mlp-3x50's layout trained elsewhere
    keras.utils.set_random_seed(0)
    keras.Sequential([
        keras.Input((8, 8, 1)), keras.layers.Flatten(),
        keras.layers.Dense(30, use_bias=False), keras.layers.LeakyReLU(),
        keras.layers.Dense(30, use_bias=False), keras.layers.LeakyReLU(),
        keras.layers.Dense(10, activation="softmax"),
    ]).save("model.h5")  # fmt: skip
    rng = np.random.default_rng(0)
    sizes = {"dense_0": (64, 50), "dense_1": (50, 50), "dense_2": (50, 50), "logits": (50, 10)}
    weights = {}
    for name, shape in sizes.items():
        weights[f"{name}/kernel"] = rng.normal(0, 0.2, shape).astype(np.float32)
        weights[f"{name}/bias"] = np.zeros(shape[1], np.float32)
    np.savez("my_weights.npz", **weights)

    section = _section("## Bring your own model")
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks].count("bash") >= 3
    try:
        for lang, code in blocks:
            if lang == "py":
                name = code.splitlines()[0].removeprefix("# ").strip()
                (tmp_path / name).write_text(code)
            elif lang == "python":
                namespace: dict = {}
                exec(compile(code, "README.md", "exec"), namespace)
            else:
                assert lang == "bash", lang
                for line in code.strip().splitlines():
                    argv = shlex.split(line)
                    assert argv[0] == "deepfault-jax", line
                    assert cli.main(argv[1:]) == 0, line
    finally:
        sys.modules.pop("my_model", None)
    assert (tmp_path / "spectrum.npz").is_file() and (tmp_path / "flax-spectrum.npz").is_file()
    assert (tmp_path / "checkpoints" / "mine" / "model.json").is_file()
