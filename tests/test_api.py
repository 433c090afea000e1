"""The public surface: documented, keyword-only options, ``key`` first."""

from __future__ import annotations

import inspect

import deepfault_jax


def test_every_public_name_is_importable_and_documented():
    assert len(set(deepfault_jax.__all__)) == len(deepfault_jax.__all__)
    for name in deepfault_jax.__all__:
        obj = getattr(deepfault_jax, name)
        doc = inspect.getdoc(obj)
        assert doc and len(doc.split()) >= 4, f"{name} needs a docstring"


def _public_functions():
    for name in deepfault_jax.__all__:
        obj = getattr(deepfault_jax, name)
        if inspect.isfunction(obj):
            yield name, obj


def test_options_are_keyword_only():
    for name, fn in _public_functions():
        for p in inspect.signature(fn).parameters.values():
            if p.default is not inspect.Parameter.empty:
                assert p.kind is inspect.Parameter.KEYWORD_ONLY, f"{name}({p.name}=...) positional"


def test_key_is_first_when_present():
    for name, fn in _public_functions():
        params = list(inspect.signature(fn).parameters)
        if "key" in params:
            assert params[0] == "key", f"{name}: key must be the first parameter"


def test_version():
    assert deepfault_jax.__version__.count(".") == 2


def test_public_names_are_their_modules_own_names():
    """No ``as`` renames: ``deepfault_jax.X`` is the object its module calls ``X``."""
    import importlib

    for name in deepfault_jax.__all__:
        obj = getattr(deepfault_jax, name)
        if inspect.isfunction(obj) or inspect.isclass(obj):
            assert obj.__name__ == name, f"{name} is {obj.__module__}.{obj.__name__}"
            assert getattr(importlib.import_module(obj.__module__), name) is obj


def test_core_modules_do_not_import_the_pipeline_report_or_cli():
    """Data flows one way: the core (errors .. faultbench) never imports the outer layers."""
    import ast
    from pathlib import Path

    outer = {"pipeline", "report", "cli", "commands"}
    package = Path(deepfault_jax.__file__).parent
    for path in package.glob("*.py"):
        if path.stem in outer or path.stem == "__init__":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.rsplit(".", 1)[-1]] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name.rsplit(".", 1)[-1] for a in node.names]
            assert not outer & set(names), f"{path.name} imports {outer & set(names)}"
