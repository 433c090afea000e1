"""Models from outside the zoo: ``keras:PATH`` files and ``flax:MODULE:FACTORY`` factories.

The commands that read a model (``spectrum``, ``localize``, ``run``, ``repair``)
take ``--model keras:PATH`` or ``--model flax:MODULE:FACTORY`` beside zoo names;
:func:`load_foreign` loads such a *source* into a :class:`ForeignModel` (what the
commands read of a :class:`~deepfault_jax.zoo.Model`: ``name``, ``input_shape``,
``num_classes``, ``activation``) and its parameters, and
:meth:`ForeignModel.probe` builds its :class:`~deepfault_jax.probe.Probe`.

* ``keras:PATH``: a ``.keras`` archive or a legacy ``.h5`` file written by
  ``model.save``, read by :func:`~deepfault_jax.keras_models.load_keras_model`
  (safe mode unless ``trusted``: the command line's ``--trust-model-file``) and
  probed by :func:`~deepfault_jax.keras_models.keras_probe`. ``values`` may be
  ``layer`` (each layer's Keras output, the original DeepFault's neuron),
  ``pre`` or ``post``. Its parameters are ``{layer: {variable: array}}``.
* ``flax:MODULE:FACTORY``: ``MODULE`` is a dotted module name importable from
  the current directory or ``sys.path`` (``PYTHONPATH``), or a path to a ``.py``
  file; ``FACTORY()`` is called without arguments and returns one of

  - ``(linen_module, params)`` or ``(linen_module, params, activation_fn)``:
    probed by :func:`~deepfault_jax.probe.linen_probe` (``params`` is the
    ``params`` collection, or ``init``'s ``{"params": ...}``); ``activation_fn``
    (elementwise) serves ``values="post"``;
  - an ``nnx.Module`` or ``(nnx_module, activation_fn)``: probed by
    :func:`~deepfault_jax.probe.nnx_probe`, its parameters the module's state;
  - ``(fn, params)`` or ``(fn, params, gated_fn)`` with ``fn(params, x) ->
    (logits, {name: activation})`` (any JAX model: Equinox, Haiku, hand-written):
    probed by :func:`~deepfault_jax.probe.function_probe`; ``gated_fn(params, x,
    edit) -> logits`` gives it gates (ablations, attribution, synthesis).

  ``values="layer"`` is a Keras notion and is refused for them.

Every problem (missing file, a file that is not a model, unsupported layers,
input shape or class count other than the data set's, a module that does not
import, a missing or wrong factory) is an :class:`~deepfault_jax.errors.InputError`
naming what was expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from deepfault_jax.errors import InputError
from deepfault_jax.probe import Probe, function_probe, linen_probe, nnx_probe

__all__ = [
    "FOREIGN_KINDS",
    "ForeignModel",
    "is_foreign",
    "load_foreign",
    "parse_source",
    "save_keras_model",
]

#: The prefixes of model sources outside the zoo.
FOREIGN_KINDS = ("keras", "flax")
_FLAX_RETURNS = (
    "expected (linen_module, params[, activation_fn]), an nnx.Module (or (nnx_module, "
    "activation_fn)), or (fn, params[, gated_fn]) with fn(params, x) -> (logits, "
    "{name: activation})"
)


def is_foreign(spec: Any) -> bool:
    """Whether a ``--model`` value names a model outside the zoo (``keras:`` or ``flax:``)."""
    return isinstance(spec, str) and spec.partition(":")[0] in FOREIGN_KINDS and ":" in spec


def parse_source(spec: str) -> tuple[str, str]:
    """``(kind, rest)`` of ``keras:PATH`` or ``flax:MODULE:FACTORY``, checked for form only."""
    kind, _, rest = spec.partition(":")
    if kind not in FOREIGN_KINDS:
        raise InputError(f"a model source must start with keras: or flax:; got {spec!r}")
    if not rest:
        what = "keras:PATH (a .keras or .h5 file)" if kind == "keras" else "flax:MODULE:FACTORY"
        raise InputError(f"--model {spec!r} names nothing; expected {what}")
    if kind == "flax":
        module, sep, factory = rest.rpartition(":")
        if not sep or not module or not factory.isidentifier():
            raise InputError(
                f"--model {spec!r} must be flax:MODULE:FACTORY (MODULE a dotted module name or "
                "a path to a .py file, FACTORY a function name in it)"
            )
    return kind, rest


@dataclasses.dataclass(frozen=True)
class ForeignModel:
    """A model from a Keras file or a Flax factory, as the commands read a zoo model.

    Attributes:
      kind: ``"keras"`` or ``"flax"``.
      spec: the absolute file path (Keras), or ``MODULE:FACTORY`` (Flax; a file module
        as its absolute path).
      name: a name for reports (the Keras model's name, or ``FACTORY``).
      input_shape: the shape of one input.
      num_classes: the number of logits.
      flavour: ``"keras"``, ``"linen"``, ``"nnx"`` or ``"function"``.
      trusted: loaded with Keras's safe mode off.
      handle: the ``keras.Model``, linen module, NNX graph definition or ``fn``.
      extra: the linen/NNX ``activation_fn`` or the function's ``gated_fn`` (or None).
    """

    kind: str
    spec: str
    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    flavour: str
    trusted: bool = False
    handle: Any = dataclasses.field(default=None, compare=False, repr=False)
    extra: Any = dataclasses.field(default=None, compare=False, repr=False)
    _probes: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def source(self) -> str:
        """``keras:/abs/path.h5`` or ``flax:MODULE:FACTORY``."""
        return f"{self.kind}:{self.spec}"

    @property
    def activation(self) -> None:
        """Foreign models have no zoo activation name (reports show null)."""
        return None

    @property
    def is_keras(self) -> bool:
        return self.kind == "keras"

    def probe(
        self,
        params: Any,
        *,
        layers: Sequence[str] | None = None,
        conv_reduce: str = "mean",
        values: str = "pre",
    ) -> Probe:
        """The probe of the model with these options (made once per options)."""
        key = (tuple(layers) if layers else None, conv_reduce, values)
        if key not in self._probes:
            self._probes[key] = self._make_probe(params, layers, conv_reduce, values)
        return self._probes[key]

    def _make_probe(self, params, layers, conv_reduce, values) -> Probe:
        if self.is_keras:
            from deepfault_jax.keras_models import keras_probe

            prb, _, _ = keras_probe(self.handle, layers=layers, values=values,
                                    conv_reduce=conv_reduce)  # fmt: skip
            return prb
        if values == "layer":
            raise InputError(
                "--values layer (each layer's Keras output) applies to keras: models only; "
                f"got the {self.flavour} model {self.source}: use --values pre or post"
            )
        if values == "post" and self.flavour != "function" and self.extra is None:
            raise InputError(
                f"--values post of {self.source} needs its activation function: return "
                f"({'module, params' if self.flavour == 'linen' else 'nnx_module'}, "
                "activation_fn) from the factory, or use --values pre"
            )
        if values == "post" and self.flavour == "function":
            raise InputError(
                f"--values post of {self.source}: a (fn, params) model's activations are what "
                "fn returns; use --values pre (return post-activation values from fn to count them)"
            )
        common = dict(input_shape=self.input_shape, layers=layers, conv_reduce=conv_reduce,
                      values=values)  # fmt: skip
        if self.flavour == "linen":
            return linen_probe(self.handle, params, activation_fn=self.extra, **common)
        if self.flavour == "nnx":
            return nnx_probe(self.handle, params, activation_fn=self.extra, **common)
        return function_probe(self.handle, params, gated_fn=self.extra, **common)

    def check_layers(self, params: Any, layers: Sequence[str]) -> None:
        """Raises InputError unless every name of ``layers`` is a hidden layer (for Keras
        models also a layer type such as ``Dense``) of the model."""
        hidden = self.probe(params, values="layer" if self.is_keras else "pre").index.layer_names
        types: set[str] = set()
        if self.is_keras:
            from deepfault_jax.keras_models import SUPPORTED_LAYERS

            types = {t for t in SUPPORTED_LAYERS if t.startswith(("Dense", "Conv"))}
        other = [n for n in layers if n not in hidden and n not in types]
        if other:
            raise InputError(
                f"layers must be hidden layers of {self.name} ({', '.join(hidden)}); got "
                f"{', '.join(map(repr, other))} (the output layer's values are the logits "
                "whose classification is being localised)"
            )

    def check_repairable(self) -> None:
        """Raises InputError when repair cannot write this model back (Flax factories), or
        when a Keras model's parameterised layers are not in the zoo's naming order (the
        repair reads each neuron's outgoing weights from the next layer by that order)."""
        if not self.is_keras:
            raise InputError(
                f"repair writes the repaired model back for every command to load, which a "
                f"flax: factory cannot take ({self.source}); save the model as a Keras file "
                "(--model keras:PATH) or its parameters in a zoo checkpoint (--checkpoint)"
            )
        from deepfault_jax.keras_models import _chain
        from deepfault_jax.keras_models import require_keras as _rk
        from deepfault_jax.neuron_params import layer_order

        keras = _rk()
        chain = [
            layer.name
            for layer in _chain(keras, self.handle)
            if getattr(layer, "trainable_variables", None)
        ]
        if chain != sorted(chain, key=layer_order):
            raise InputError(
                f"repair of the Keras model {self.name!r} needs its layers with weights named "
                f"in call order as conv*, dense*, then the output (got {', '.join(chain)}); "
                "rename the layers (name=...) and save the model again"
            )


# --------------------------------------------------------------------------- loading


def load_foreign(
    spec: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    dataset_name: str = "the data set",
    trusted: bool = False,
    layers: Sequence[str] | None = None,
    values: str = "layer",
    conv_reduce: str = "mean",
) -> tuple[ForeignModel, Any]:
    """``(model, params)`` of ``keras:PATH`` or ``flax:MODULE:FACTORY``, checked against a data
    set's ``input_shape`` and ``num_classes`` (errors name both values)."""
    kind, rest = parse_source(spec)
    shape = tuple(int(d) for d in input_shape)
    if kind == "keras":
        model, params = _load_keras(rest, shape, trusted, layers, values, conv_reduce,
                                    dataset_name)  # fmt: skip
    else:
        model, params = _load_flax(rest, shape, dataset_name)
    if model.num_classes != int(num_classes):
        raise InputError(
            f"the model {model.source} has {model.num_classes} classes (outputs); the data set "
            f"{dataset_name!r} has {num_classes}"
        )
    return model, params


def _load_keras(path_text, shape, trusted, layers, values, conv_reduce, dataset_name):
    from deepfault_jax.keras_models import KERAS_VALUES, keras_probe, load_keras_model

    path = Path(path_text).expanduser().absolute()
    model = load_keras_model(path, safe_mode=not trusted)
    values = values if values in KERAS_VALUES else "layer"
    _, params, info = keras_probe(model, layers=list(layers) if layers else None, values=values,
                                  conv_reduce=conv_reduce)  # fmt: skip
    if tuple(info.input_shape) != shape:
        hint = ""
        if len(info.input_shape) == 1 and info.input_shape[0] == math.prod(shape):
            hint = (f" (add keras.layers.Flatten() after keras.Input({shape}) to take the "
                    "data set's images)")  # fmt: skip
        raise InputError(
            f"the Keras model {path} takes inputs of shape {list(info.input_shape)}; the data "
            f"set {dataset_name!r} has inputs of shape {list(shape)}{hint}"
        )
    fm = ForeignModel("keras", str(path), info.name, tuple(info.input_shape), info.num_classes,
                      "keras", bool(trusted), model)  # fmt: skip
    return fm, params


def _import_module(module_text: str):
    """The module of a flax: source: a .py file path, or a dotted name importable from the
    current directory or sys.path."""
    if module_text.endswith(".py") or os.sep in module_text or "/" in module_text:
        path = Path(module_text).expanduser().absolute()
        if not path.is_file():
            raise InputError(
                f"flax module file {str(path)!r} does not exist; expected a .py file defining "
                "the factory"
            )
        name = f"_deepfault_jax_factory_{abs(hash(str(path)))}"
        try:
            spec = importlib.util.spec_from_file_location(name, path)
            if spec is None or spec.loader is None:
                raise ImportError(f"cannot read {path} as Python")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        except Exception as e:  # anything the user's code raises on import
            sys.modules.pop(name, None)
            raise InputError(
                f"cannot import flax module file {path} ({type(e).__name__}: {_first_line(e)})"
            ) from e
        return module, str(path)
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
    try:
        return importlib.import_module(module_text), module_text
    except Exception as e:
        raise InputError(
            f"cannot import flax module {module_text!r} ({type(e).__name__}: {_first_line(e)}); "
            "expected a module importable from the current directory or PYTHONPATH, or a path "
            "to a .py file"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def _load_flax(rest: str, shape: tuple[int, ...], dataset_name: str):
    module_text, _, factory_name = rest.rpartition(":")
    module, shown = _import_module(module_text)
    spec = f"{shown}:{factory_name}"
    factory = getattr(module, factory_name, None)
    if factory is None:
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise InputError(
            f"flax module {shown!r} has no factory {factory_name!r}; expected a function "
            f"returning the model (callables there: {', '.join(found[:8]) or 'none'})"
        )
    if not callable(factory):
        raise InputError(
            f"flax factory {spec} is a {type(factory).__name__}, not callable; expected a "
            "function taking no arguments that returns the model"
        )
    try:
        made = factory()
    except Exception as e:
        raise InputError(
            f"flax factory {spec}() raised {type(e).__name__}: {_first_line(e)}"
        ) from e
    flavour, handle, params, extra = _interpret(made, spec)
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    try:
        logits = jax.eval_shape(_logits_fn(flavour, handle), params, x)
    except Exception as e:
        raise InputError(
            f"the flax model {spec} cannot take the data set {dataset_name!r}'s inputs of "
            f"shape {list(shape)} ({type(e).__name__}: {_first_line(e)})"
        ) from e
    if flavour == "function":
        if not (isinstance(logits, tuple) and len(logits) == 2 and isinstance(logits[1], dict)):
            raise InputError(
                f"flax factory {spec}: fn(params, x) returns {_describe(logits)}; expected "
                "(logits, {name: activation}) (the probe reads the named activations)"
            )
        logits = logits[0]
    if not hasattr(logits, "shape") or len(logits.shape) != 2:
        raise InputError(
            f"the flax model {spec} returns {_describe(logits)} for inputs of shape "
            f"{list(shape)}; expected logits of shape [batch, classes]"
        )
    model = ForeignModel("flax", spec, factory_name, shape, int(logits.shape[-1]), flavour,
                         False, handle, extra)  # fmt: skip
    return model, params


def _describe(value: Any) -> str:
    if hasattr(value, "shape"):
        return f"an array of shape {list(value.shape)}"
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return f"a {type(value).__name__}"


def _interpret(made: Any, spec: str) -> tuple[str, Any, Any, Any]:
    """``(flavour, handle, params, extra)`` of what a factory returned."""
    if isinstance(made, nnx.Module):
        graphdef, state = nnx.split(made)
        return "nnx", graphdef, state, None
    if isinstance(made, tuple) and made:
        head = made[0]
        if isinstance(head, nnx.Module) and len(made) == 2 and callable(made[1]):
            graphdef, state = nnx.split(head)
            return "nnx", graphdef, state, made[1]
        if isinstance(head, nn.Module) and len(made) in (2, 3):
            params = made[1]
            if isinstance(params, dict) and set(params) == {"params"}:
                params = params["params"]
            extra = made[2] if len(made) == 3 else None
            if extra is not None and not callable(extra):
                raise InputError(
                    f"flax factory {spec} returned a third element of type "
                    f"{type(extra).__name__}; expected the activation function"
                )
            return "linen", head, params, extra
        if callable(head) and not isinstance(head, (nn.Module, nnx.Module)) and len(made) in (2, 3):
            extra = made[2] if len(made) == 3 else None
            if extra is not None and not callable(extra):
                raise InputError(
                    f"flax factory {spec} returned a third element of type "
                    f"{type(extra).__name__}; expected gated_fn(params, x, edit) -> logits"
                )
            return "function", head, made[1], extra
    raise InputError(f"flax factory {spec} returned {_describe(made)}; {_FLAX_RETURNS}")


def _logits_fn(flavour: str, handle: Any) -> Callable:
    if flavour == "linen":
        return lambda p, x: handle.apply({"params": p}, x)
    if flavour == "nnx":
        return lambda p, x: nnx.merge(handle, p)(x)
    return handle


# --------------------------------------------------------------------------- writing back


def save_keras_model(model: ForeignModel, params: dict, path: str | os.PathLike) -> Path:
    """Writes the Keras model of ``model`` with the weights ``params`` (``{layer:
    {variable: array}}``, as :func:`~deepfault_jax.keras_models.keras_probe` gives) to
    ``path`` (``.keras``), loadable by ``--model keras:PATH``. The loaded model's own
    variables are restored afterwards."""
    if not model.is_keras:
        raise InputError(f"only Keras models can be saved as Keras files; got {model.source}")
    keras_model = model.handle
    path = Path(path)
    saved = []
    try:
        for layer in keras_model.layers:
            own = params.get(layer.name)
            if own is None:
                continue
            for v in list(layer.trainable_variables) + list(layer.non_trainable_variables):
                if v.name in own:
                    saved.append((v, v.value))
                    v.assign(jnp.asarray(own[v.name], v.dtype))
        keras_model.save(str(path))
    finally:
        for v, value in saved:
            v.assign(value)
    return path
