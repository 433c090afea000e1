"""Where a model comes from, shared by the run and the ``spectrum`` and ``localize`` commands;
and the command line's localizer options.

* :func:`load_model` gives ``(model, params, meta)`` from a checkpoint, a zoo
  model (trained on first use and cached), or a model from outside the zoo
  (``keras:PATH``, ``flax:MODULE:FACTORY``: a :class:`~deepfault_jax.foreign.ForeignModel`);
  a ``check`` sees the loaded model, or an untrained copy of the zoo model,
  before any training.
* :func:`model_probe` probes it as the ``layers``, ``conv_reduce`` and ``values``
  settings say.
* :func:`parse_option` reads one ``--option KEY=VALUE``; :func:`check_needs` checks
  that a probe and its parameters give a localizer what it reads (gates, parameters).

A *source* is any object with the attributes ``checkpoint`` (a directory or None),
``model``, ``activation`` and ``seed`` (a zoo model, or a ``keras:``/``flax:``
source), optionally ``trust_model_file`` (Keras's safe mode off), and ``layers``,
``conv_reduce`` and ``values`` (its probe): the parsed options of a command, or a
:class:`~deepfault_jax.pipeline.RunConfig`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deepfault_jax import checkpoints, data, foreign, localizers, probe, zoo
from deepfault_jax.errors import InputError
from deepfault_jax.keras_models import KERAS_VALUES
from deepfault_jax.progress import Progress

__all__ = [
    "VALUES",
    "check_needs",
    "check_source",
    "check_values",
    "load_model",
    "model_probe",
    "parse_option",
]

#: Every ``values`` a command takes: ``layer`` (Keras models only), ``pre``, ``post``.
VALUES = KERAS_VALUES

#: ``check(model, params)``: raises InputError for a model that cannot do the job.
ModelCheck = Callable[[zoo.Model, Any], None]


def model_probe(source: Any, model: zoo.Model, params: Any) -> probe.Probe:
    """The probe of ``model`` that ``source``'s ``layers``, ``conv_reduce`` and ``values``
    ask for."""
    layers = list(source.layers) if source.layers else None
    if isinstance(model, foreign.ForeignModel):
        return model.probe(params, layers=layers, conv_reduce=source.conv_reduce,
                           values=source.values)  # fmt: skip
    check_values(source.values, f"the zoo model {model.name}")
    return probe.model_probe(model, params, layers=layers, conv_reduce=source.conv_reduce,
                             values=source.values)  # fmt: skip


def check_values(values: str, what: str | None = None) -> None:
    """Raises InputError unless ``values`` is one of :data:`VALUES`, and ``layer`` only for a
    ``keras:`` model: ``what`` names the model (a ``--model`` value, or words); None when it
    is not known yet (then ``layer`` passes). For zoo and Flax models a layer's output is its
    pre-activation value: ``pre`` says so."""
    if values not in VALUES:
        raise InputError(f"values must be one of {', '.join(VALUES)}; got {values!r}")
    if values == "layer" and what is not None and not what.startswith("keras:"):
        shown = what
        raise InputError(
            "--values layer (each layer's output as Keras defines it) applies to keras: models "
            f"only; got {shown}: use --values pre (the layer's output before the activation) "
            "or post"
        )


def check_source(source: Any) -> None:
    """Checks, before any file is read, what can be checked of ``source`` alone: the form of a
    ``keras:``/``flax:`` model, ``values`` (``layer`` only for Keras models) and
    ``trust_model_file`` (Keras models only)."""
    model = getattr(source, "model", None)
    what = f"checkpoint {source.checkpoint}" if source.checkpoint else model
    if not source.checkpoint and foreign.is_foreign(model):
        foreign.parse_source(model)
    check_values(source.values, what)
    if getattr(source, "trust_model_file", False) and not (
        not source.checkpoint and isinstance(model, str) and model.startswith("keras:")
    ):
        raise InputError(
            f"--trust-model-file goes with --model keras:PATH (it turns Keras's safe mode off); "
            f"got {what or 'no model'}"
        )


def load_model(
    source: Any,
    dataset: data.Dataset,
    *,
    check: ModelCheck | None = None,
    progress: Progress | None = None,
) -> tuple:
    """``(model, params, meta)`` of ``source.checkpoint``, or of the zoo model
    ``source.model`` (trained on ``dataset`` on first use and cached); ``meta["source"]``
    names it (the checkpoint's absolute path, ``zoo:MODEL:ACTIVATION:seedN``,
    ``keras:/ABS/PATH`` or ``flax:MODULE:FACTORY``).

    ``check`` (by default, that ``source``'s probe fits the model) is called with the
    loaded checkpoint's model, or with an untrained copy of the zoo model, before any
    training.
    """
    check_source(source)
    check = check or (lambda model, params: model_probe(source, model, params))
    if not source.checkpoint and foreign.is_foreign(source.model):
        model, params = foreign.load_foreign(
            source.model, input_shape=dataset.input_shape, num_classes=dataset.num_classes,
            dataset_name=dataset.name, trusted=bool(getattr(source, "trust_model_file", False)),
            layers=source.layers, values=source.values, conv_reduce=source.conv_reduce,
        )  # fmt: skip
        check(model, params)
        return model, params, {"source": model.source, "checkpoint": None}
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
