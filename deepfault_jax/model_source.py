"""Where a model comes from, shared by the run and the ``spectrum`` and ``localize`` commands;
and the command line's localizer options.

* :func:`load_model` gives ``(model, params, meta)`` from a checkpoint or a zoo
  model (trained on first use and cached); a ``check`` sees the loaded
  checkpoint's model, or an untrained copy of the zoo model, before any training.
* :func:`model_probe` probes it as the ``layers``, ``conv_reduce`` and ``values``
  settings say.
* :func:`parse_option` reads one ``--option KEY=VALUE``; :func:`check_needs` checks
  that a probe and its parameters give a localizer what it reads (gates, parameters).

A *source* is any object with the attributes ``checkpoint`` (a directory or None),
``model``, ``activation`` and ``seed`` (a zoo model), and ``layers``,
``conv_reduce`` and ``values`` (its probe): the parsed options of a command, or a
:class:`~deepfault_jax.pipeline.RunConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deepfault_jax import checkpoints, data, localizers, probe, zoo
from deepfault_jax.errors import InputError
from deepfault_jax.progress import Progress

__all__ = ["check_needs", "load_model", "model_probe", "parse_option"]

#: ``check(model, params)``: raises InputError for a model that cannot do the job.
ModelCheck = Callable[[zoo.Model, Any], None]


def model_probe(source: Any, model: zoo.Model, params: Any) -> probe.Probe:
    """The probe of ``model`` that ``source``'s ``layers``, ``conv_reduce`` and ``values``
    ask for."""
    layers = list(source.layers) if source.layers else None
    return probe.model_probe(model, params, layers=layers, conv_reduce=source.conv_reduce,
                             values=source.values)  # fmt: skip


def load_model(
    source: Any,
    dataset: data.Dataset,
    *,
    check: ModelCheck | None = None,
    progress: Progress | None = None,
) -> tuple:
    """``(model, params, meta)`` of ``source.checkpoint``, or of the zoo model
    ``source.model`` (trained on ``dataset`` on first use and cached); ``meta["source"]``
    names it (the checkpoint's absolute path, or ``zoo:MODEL:ACTIVATION:seedN``).

    ``check`` (by default, that ``source``'s probe fits the model) is called with the
    loaded checkpoint's model, or with an untrained copy of the zoo model, before any
    training.
    """
    check = check or (lambda model, params: model_probe(source, model, params))
    if source.checkpoint:
        model, params, meta = checkpoints.load_checkpoint(
            source.checkpoint, input_shape=dataset.input_shape
        )
        if model.num_classes != dataset.num_classes:
            raise InputError(f"checkpoint {source.checkpoint} has {model.num_classes} classes; "
                             f"data set {dataset.name!r} has {dataset.num_classes}")  # fmt: skip
        check(model, params)
        return (
            model,
            params,
            {**meta, "source": str(Path(source.checkpoint).expanduser().absolute())},
        )
    import jax

    untrained = zoo.create_model(
        source.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
        activation=source.activation,
    )  # fmt: skip
    check(untrained, zoo.init_params(jax.random.key(0), untrained))
    model, params, meta = checkpoints.load_or_train(source.model, dataset, seed=source.seed,
                                                    activation=source.activation,
                                                    progress=progress)  # fmt: skip
    return (
        model,
        params,
        {**meta, "source": f"zoo:{source.model}:{source.activation}:seed{source.seed}"},
    )


def _hashable(value: Any, text: str) -> Any:
    """A JSON value as an option value: lists become tuples (options are memo keys)."""
    if isinstance(value, list):
        return tuple(_hashable(v, text) for v in value)
    if isinstance(value, dict):
        raise InputError(
            f"--option values must be numbers, strings, booleans or lists; got {text!r}"
        )
    return value


def parse_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as ``(key, value)``: the value read as JSON where it parses
    (``steps=10``, ``gains=[-1,0,2]``, ``methods=["gradxact","grad_norm"]``), else the text
    (``measure=ochiai``)."""
    key, sep, value = str(text).partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise InputError(f"--option must be KEY=VALUE with KEY a name; got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        return key, value
    return key, _hashable(parsed, text)


def check_needs(
    info: localizers.LocalizerInfo, options: Mapping[str, Any], prb: probe.Probe, params: Any
) -> None:
    """Raises InputError when ``prb`` and ``params`` lack what localizer ``info`` reads: the
    gates of its layers (ablations), its neurons' own parameters (gradients), or what the
    localizers an ``aggregate`` combines read."""
    what = f"localizer {info.name!r}"
    if info.needs == "gates":
        prb.require_gates(what)
    elif info.needs == "parameters":
        from deepfault_jax.neuron_params import neuron_layout

        neuron_layout(prb, params, what=what)
    elif info.needs == "localizers":
        methods = options.get("methods", info.options.get("methods", ()))
        for name in (methods,) if isinstance(methods, str) else tuple(methods):
            check_needs(localizers.localizer_info(name), {}, prb, params)
