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
    assert namespace["report"]["results"] and (tmp_path / "runs" / "lenet5" / "report.md").is_file()
