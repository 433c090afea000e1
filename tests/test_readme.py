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
