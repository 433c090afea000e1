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
