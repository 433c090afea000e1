"""Keras 3 models as DeepFault probes: load a ``.keras`` / ``.h5`` file, run it in pure JAX.

:func:`load_keras_model` reads a model saved by Keras (``model.save("m.keras")``, or a
legacy Keras 2 ``.h5`` file) and :func:`keras_probe` turns it into a
:class:`~deepfault_jax.probe.Probe` and its parameters, so that spectra,
localization, attribution, exact ablation and synthesis run on it like on any
other probe. Keras must use its JAX backend: :func:`require_keras` sets
``KERAS_BACKEND=jax`` when keras is not imported yet and refuses a keras that was
imported with another backend. Nothing here needs TensorFlow.

* **Which models.** Sequential models and Functional models whose layers form
  one chain (one input, one output, each layer called once on the previous
  layer's output) of ``InputLayer``, ``Dense``, ``Conv1D/2D/3D``, max/average
  pooling, global average pooling, ``ZeroPadding``, ``Flatten``, ``Reshape``,
  ``Activation``, ``ReLU``, ``LeakyReLU``, ``Softmax``, ``Dropout`` (inference:
  the identity), ``BatchNormalization`` (inference: the moving statistics) and
  ``Lambda`` (its Python function runs, traced by JAX: a model from a file has
  one only when loaded with ``safe_mode=False``).
  Every supported layer has one input, so every accepted model is a chain and
  its probe has gates; a model with merge layers (``Add``, ``Concatenate``),
  nested models or any other layer is refused with an :class:`InputError` naming
  the layer and its class.
* **Neurons.** By default every Dense and Conv layer but the output layer (the
  last of them in the chain); ``layers`` may name layers or layer types
  (``"Dense"``, ``"Conv2D"``; a type selects its hidden layers, the output layer
  is probed only when named).
* **Values.** ``values="layer"`` (the default) counts each probed layer's
  output as Keras defines it: after the layer's built-in activation
  (``Conv2D(activation="relu")`` gives post-relu values), and the raw
  ``x @ W + b`` when the activation is a separate layer (DeepFault's MLPs:
  ``Dense(use_bias=False)`` then ``LeakyReLU``). This is the neuron of the
  original DeepFault, which reads ``layer.output`` of its Keras models.
  ``values="pre"`` counts the kernel/bias output before the layer's built-in
  activation. ``values="post"`` counts the value after the activation: the
  layer's own (when it has a non-linear one), else that of an immediately
  following ``Activation``/``ReLU``/``LeakyReLU`` layer; a layer with neither is
  refused. Dense and Conv layers are computed from their parameters with the
  same Keras ops as the layers' ``call`` (``matmul`` + bias, ``ops.conv`` with
  the layer's strides, padding and dilation + bias, then ``layer.activation``),
  so the pre-activation is available; every other layer runs through its own
  ``stateless_call``. The tests check all three against ``keras.Model(...)``
  sub-models of the same file.
* **Conv channels.** A conv layer's ``[batch, ..., channels]`` value is reduced
  by ``conv_reduce`` as in every probe: ``"mean"`` (the original's channel mean),
  ``"max"`` or ``"none"``. Conv layers must be ``channels_last``.
* **Softmax.** When the model ends in softmax (a Dense/Conv with
  ``activation="softmax"``, or a final ``Softmax``/``Activation("softmax")``
  layer), the probe's logits are ``log_softmax`` of the pre-softmax values, i.e.
  log-probabilities, so cross-entropy losses are right and the argmax is the
  model's prediction (``KerasModelInfo.ends_in_softmax``). If the probed value
  itself is the softmax output (the output layer probed with ``"layer"`` or
  ``"post"``), the logits are the log of those (gated) probabilities, clipped
  at the smallest positive float. Other outputs are returned as they are.
* **Gates.** ``probe.gated`` runs the chain with each probed neuron value
  multiplied by its gate before the later layers read it (the pre-activation
  for ``"pre"``, so a gate of 0 then zeroes the activation's input). Attribution,
  exact ablation and synthesis use it.
* **Parameters.** ``params`` is a dict ``{layer name: {variable name: array}}``
  (``{"dense": {"kernel": ..., "bias": ...}, "batch_normalization": {"gamma":
  ..., "moving_mean": ...}}``) holding copies of the model's variables as
  ``jnp`` arrays, for every layer of the chain that has variables (not
  ``Dropout``, whose only variable is its random seed). The probe never reads
  the Keras variables: change ``params`` to change the model.

**Safety.** :func:`load_keras_model` loads with Keras's ``safe_mode`` on by
default: no Python code stored in the file is run (``Lambda`` layers and lambda
activations are refused, naming the layer, before Keras reads them), and only
classes that exist in Keras or were registered in this process are built. Both
formats hold JSON configs and HDF5 weights, never pickles. ``safe_mode=False``
(the command line's ``--trust-model-file``) lets Keras run the code in the file:
only for files you trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from deepfault_jax.cpu_layers import measured_faster, padded_dense, pads_dense, single_channel_conv
from deepfault_jax.errors import InputError, InputTypeError
from deepfault_jax.probe import CONV_REDUCTIONS, Probe, _finish

__all__ = [
    "KERAS_VALUES",
    "MIN_KERAS",
    "KerasModelInfo",
    "SUPPORTED_LAYERS",
    "TRUST_OPTION",
    "check_input_shape",
    "keras_probe",
    "load_keras_model",
    "require_keras",
]

#: Which value of a probed layer is its neuron: its Keras output, before or after the activation.
KERAS_VALUES = ("layer", "pre", "post")
#: The oldest Keras accepted: its safe mode closed the known bypasses (module-named
#: functions in a config, CVE-2025-1550, and later ones).
MIN_KERAS = (3, 12)
#: The command-line option that turns Keras's safe mode off.
TRUST_OPTION = "--trust-model-file"
_INSTALL_HINT = "keras is not installed: pip install -e '.[keras]'"

_PROBED = ("Dense", "Conv1D", "Conv2D", "Conv3D")
_ACTIVATIONS = ("Activation", "ReLU", "LeakyReLU")
_IDENTITY = ("Dropout",)
_STATELESS = (
    "Activation", "ReLU", "LeakyReLU", "Softmax", "BatchNormalization", "Flatten", "Reshape",
    "Lambda",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
    "ZeroPadding1D", "ZeroPadding2D", "ZeroPadding3D",
)  # fmt: skip
#: The layer classes :func:`keras_probe` accepts (besides ``InputLayer``).
SUPPORTED_LAYERS = _PROBED + _IDENTITY + _STATELESS
_HDF5_SUFFIXES = (".h5", ".hdf5")


# --------------------------------------------------------------------------- keras itself


def require_keras():
    """Imports keras with the JAX backend and returns the module.

    Sets ``KERAS_BACKEND=jax`` unless the variable is set or keras is already
    imported. Raises :class:`InputError` when keras is missing (``keras is not
    installed: pip install -e '.[keras]'``), older than 3, or runs another backend.
    """
    if "keras" not in sys.modules:
        os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError as e:
        if e.name in ("keras", "h5py"):
            raise InputError(_INSTALL_HINT) from e
        backend = os.environ.get("KERAS_BACKEND", "jax")
        raise InputError(
            f"keras could not be imported with backend {backend!r} ({e}); expected the JAX "
            "backend: set KERAS_BACKEND=jax"
        ) from e
    version = getattr(keras, "__version__", "0")
    parts = re.match(r"(\d+)\.(\d+)", version)
    if parts is None or (int(parts.group(1)), int(parts.group(2))) < MIN_KERAS:
        shown = ".".join(map(str, MIN_KERAS))
        raise InputError(
            f"keras must be version {shown} or later (earlier releases' safe mode could be "
            f"bypassed); got {version}: pip install -U 'keras>={shown}'"
        )
    backend = keras.backend.backend()
    if backend != "jax":
        raise InputError(
            f"keras runs the {backend!r} backend; expected 'jax' (set KERAS_BACKEND=jax "
            "before keras is first imported)"
        )
    return keras


def _require_h5py():
    try:
        import h5py
    except ImportError as e:
        raise InputError(_INSTALL_HINT) from e
    return h5py


# --------------------------------------------------------------------------- loading


def _read_config(path: Path) -> dict:
    """The model config stored in a ``.keras`` archive or a Keras ``.h5`` file (JSON only:
    nothing in the file is run), or an :class:`InputError` saying what the file is."""
    expected = "expected a Keras model saved by model.save(...) as a .keras or .h5 file"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "config.json" not in names:
                    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
                    raise InputError(
                        f"{path} is a zip archive without config.json (it holds {shown or 'nothing'}); "
                        f"{expected}"
                    )
                raw = archive.read("config.json")
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{path} is a damaged zip archive ({e}); {expected}") from e
        if path.suffix != ".keras":
            raise InputError(
                f"{path} is a .keras archive named {path.suffix or 'without a suffix'}; "
                "expected the suffix .keras (Keras reads archives only under that name)"
            )
    else:
        h5py = _require_h5py()
        if not h5py.is_hdf5(path):
            with open(path, "rb") as f:
                head = f.read(8)
            raise InputError(
                f"{path} is neither a .keras zip archive nor an HDF5 file (it starts with "
                f"{head!r}); {expected}"
            )
        try:
            with h5py.File(path, "r") as f:
                raw = f.attrs.get("model_config")
        except OSError as e:
            raise InputError(f"{path} is a damaged HDF5 file ({e}); {expected}") from e
        if raw is None:
            raise InputError(
                f"{path} is an HDF5 file without a model config (a weights-only file?); {expected}"
            )
        if path.suffix not in _HDF5_SUFFIXES:
            raise InputError(
                f"{path} is a Keras HDF5 model named {path.suffix or 'without a suffix'}; "
                "expected the suffix .h5 or .hdf5 (Keras reads HDF5 models only under those names)"
            )
    try:
        config = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path}: its model config is not valid JSON ({e}); {expected}") from e
    if not isinstance(config, dict) or "class_name" not in config:
        raise InputError(f"{path}: its model config names no model class; {expected}")
    return config


def _saved_layers(config: Any):
    """Yields ``(name, class name, config dict)`` of every layer in a saved model config,
    nested models included."""
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            layers = item.get("layers")
            if isinstance(layers, list):
                for entry in layers:
                    if isinstance(entry, dict) and "class_name" in entry:
                        sub = entry.get("config")
                        name = sub.get("name", "?") if isinstance(sub, dict) else "?"
                        yield str(name), str(entry["class_name"]), entry
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _holds_lambda(entry: dict) -> bool:
    """Whether a saved layer runs Python code named or stored in the file: any ``Lambda``
    layer (a Keras 2 marshalled function, a Keras 3 ``__lambda__``, or a function named by
    module), or a Keras 3 ``__lambda__`` function (a lambda activation) anywhere in its
    config."""
    config = entry.get("config")
    if entry.get("class_name") == "Lambda":
        return True
    stack = [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("class_name") == "__lambda__":
                return True
            stack.extend(v for k, v in item.items() if k != "layers")
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _outside_keras(keras, config: Any) -> list[tuple[str, str]]:
    """``(module, class name)`` of every object in a saved config that names a module outside
    Keras (``"module": "os"``) and is not a class registered in this process
    (``keras.saving.register_keras_serializable``): deserializing it would import that
    module and call into it, which safe mode must not allow whatever the installed Keras
    checks."""
    registered = keras.saving.get_custom_objects()
    found, stack = [], [config]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            module = item.get("module")
            if (
                isinstance(module, str)
                and module.split(".")[0] != "keras"
                and item.get("registered_name") not in registered
            ):
                found.append((module, str(item.get("class_name", "?"))))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _trust_message(path: Path, layers: Sequence[tuple[str, str]]) -> str:
    named = ", ".join(f"{name!r} ({cls})" for name, cls in layers)
    return (
        f"{path}: layer {named} holds Python code, which safe mode does not run; expected "
        f"a model without Lambda layers or lambda functions. Pass {TRUST_OPTION} "
        "(Python: load_keras_model(path, safe_mode=False)) to load code from the file, "
        "only if you trust it"
    )


def _unknown_classes(keras, config: dict) -> list[tuple[str, str]]:
    """Saved layers whose class is neither a Keras layer nor registered in this process."""
    registered = keras.saving.get_custom_objects()
    models = {"Sequential", "Functional", "Model"}
    unknown = []
    for name, cls, entry in _saved_layers(config):
        registered_name = entry.get("registered_name") or cls
        builtin = cls in models or isinstance(getattr(keras.layers, cls, None), type)
        if not builtin and cls not in registered and registered_name not in registered:
            unknown.append((name, registered_name))
    return unknown


def load_keras_model(path: str | os.PathLike, *, safe_mode: bool = True):
    """Loads a Keras model from a ``.keras`` archive or a legacy (Keras 2) ``.h5`` file.

    Args:
      path: the file, as written by ``model.save``.
      safe_mode: Keras's safe mode (default on): code stored in the file (``Lambda``
        layers, lambda functions) is refused, not run. ``False`` (the command line's
        ``--trust-model-file``) loads and later runs it: only for files you trust.

    Returns:
      The ``keras.Model``, uncompiled (``compile=False``: no optimizer or loss is built).

    Raises:
      InputError: the path is missing or not a Keras model file; keras is not
        installed; a layer holds code under safe mode; a layer's class is unknown;
        Keras cannot read the file (its error is chained).
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise InputError(
            f"Keras model file {str(path)!r} does not exist; expected a .keras or .h5 file"
        )
    if path.is_dir():
        raise InputError(f"{path} is a directory; expected a .keras or .h5 model file")
    keras = require_keras()
    config = _read_config(path)
    if safe_mode:
        coded = [(name, cls) for name, cls, entry in _saved_layers(config) if _holds_lambda(entry)]
        if coded:
            raise InputError(_trust_message(path, coded))
        outside = _outside_keras(keras, config)
        if outside:
            named = ", ".join(f"{cls} from module {module!r}" for module, cls in outside[:3])
            raise InputError(
                f"{path} names code outside Keras ({named}), which safe mode does not import; "
                "expected built-in Keras objects, or classes registered with "
                "keras.saving.register_keras_serializable before loading. Pass "
                f"{TRUST_OPTION} (Python: load_keras_model(path, safe_mode=False)) only for a "
                "file you trust"
            )
    try:
        model = keras.saving.load_model(path, safe_mode=bool(safe_mode), compile=False)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError) as e:
        unknown = _unknown_classes(keras, config)
        if unknown:
            named = ", ".join(f"{name!r} ({cls})" for name, cls in unknown)
            raise InputError(
                f"{path}: layer {named} is not a Keras layer; expected built-in Keras layers "
                "(the file does not hold the code of custom classes; register them with "
                "keras.saving.register_keras_serializable before loading)"
            ) from e
        if safe_mode and "lambda" in str(e).lower():
            raise InputError(_trust_message(path, [("?", "lambda")])) from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"cannot load Keras model {path} ({type(e).__name__}: {first[:300]}); expected a "
            "model saved by model.save(...)"
        ) from e
    if not isinstance(model, keras.Model):
        raise InputError(f"{path} holds a {type(model).__name__}; expected a keras.Model")
    return model


# --------------------------------------------------------------------------- the layer chain


@dataclasses.dataclass(frozen=True)
class KerasModelInfo:
    """What :func:`keras_probe` learned about a Keras model.

    Attributes:
      name: the model's name.
      input_shape: the shape of one input (without the batch axis).
      num_classes: the number of outputs (the output layer's units).
      ends_in_softmax: whether the model's output is a softmax (then the probe's
        logits are log-probabilities).
      layers: the probed layers, in model order.
      layer_types: their classes (``"Dense"``, ``"Conv2D"``).
      values: ``"layer"``, ``"pre"`` or ``"post"``.
      chain: ``(name, class)`` of every layer the probe runs, in order.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    ends_in_softmax: bool
    layers: tuple[str, ...]
    layer_types: tuple[str, ...]
    values: str
    chain: tuple[tuple[str, str], ...]


def check_input_shape(info: KerasModelInfo, dataset_input_shape: Sequence[int]) -> None:
    """Raises :class:`InputError` naming both shapes when a data set's input shape is not
    the model's."""
    got = tuple(int(d) for d in dataset_input_shape)
    if got != tuple(info.input_shape):
        raise InputError(
            f"the Keras model {info.name!r} takes inputs of shape {list(info.input_shape)}; "
            f"the data set's inputs have shape {list(got)}"
        )


def _kind(keras, layer) -> str:
    """The supported class name of ``layer`` (exact classes only), or an InputError."""
    for name in ("InputLayer", *SUPPORTED_LAYERS):
        if type(layer) is getattr(keras.layers, name, None):
            return name
    raise InputError(
        f"layer {layer.name!r} has class {type(layer).__name__}, which the Keras probe does "
        f"not support; expected one of InputLayer, {', '.join(SUPPORTED_LAYERS)}"
    )


def _chain(keras, model) -> list:
    """The model's layers in call order (InputLayers dropped), or an InputError when they
    are not one chain."""
    if not isinstance(model, keras.Model):
        raise InputTypeError(f"model must be a keras.Model; got {type(model).__name__}")
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not model.built or not inputs or not outputs:
        raise InputError(
            f"model {model.name!r} has no defined inputs and outputs; expected a built "
            "Sequential or Functional model (give it a keras.Input)"
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise InputError(
            f"model {model.name!r} has {len(inputs)} inputs and {len(outputs)} outputs; "
            "expected one of each"
        )
    if isinstance(model, keras.Sequential):
        return [layer for layer in model.layers if type(layer) is not keras.layers.InputLayer]
    if type(model).__name__ != "Functional":
        raise InputError(
            f"model {model.name!r} is a subclassed {type(model).__name__}; expected a "
            "Sequential or Functional model"
        )
    # walk back from the output along each tensor's producing layer
    chain, tensor = [], outputs[0]
    while tensor is not inputs[0]:
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            raise InputError(f"cannot read the layer graph of model {model.name!r}")
        layer = history.operation
        if type(layer) is keras.layers.InputLayer:
            break
        args = layer._inbound_nodes[history.node_index].input_tensors
        if len(args) != 1:
            raise InputError(
                f"layer {layer.name!r} ({type(layer).__name__}) of model {model.name!r} takes "
                f"{len(args)} inputs; expected a chain of single-input layers"
            )
        chain.append(layer)
        tensor = args[0]
    chain.reverse()
    names = [layer.name for layer in chain]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise InputError(
            f"layer {twice[0]!r} of model {model.name!r} is called more than once; expected "
            "each layer once"
        )
    return chain


def _is(keras, fn, name: str) -> bool:
    return fn is getattr(keras.activations, name)


def _has_activation(keras, layer) -> bool:
    fn = getattr(layer, "activation", None)
    return fn is not None and not _is(keras, fn, "linear")


def _check_layer(keras, layer, kind: str) -> None:
    dtype = getattr(layer, "compute_dtype", "float32")
    if kind != "InputLayer" and dtype != "float32":
        raise InputError(f"layer {layer.name!r} ({kind}) computes in {dtype}; expected float32")
    if kind in _PROBED:
        if getattr(layer, "lora_enabled", False):
            raise InputError(f"layer {layer.name!r} ({kind}) has LoRA enabled; expected none")
        if getattr(layer, "quantization_mode", None) is not None:
            raise InputError(
                f"layer {layer.name!r} ({kind}) is quantized ({layer.quantization_mode}); "
                "expected float32 weights"
            )
    if kind.startswith("Conv") and layer.data_format != "channels_last":
        raise InputError(
            f"layer {layer.name!r} ({kind}) uses data_format {layer.data_format!r}; "
            "expected 'channels_last'"
        )
    if kind.startswith("Conv") and getattr(layer, "groups", 1) != 1:
        raise InputError(f"layer {layer.name!r} ({kind}) has groups={layer.groups}; expected 1")


def _ends_in_softmax(keras, layer, kind: str) -> bool:
    if kind == "Softmax":
        axis = layer.axis
        axis = axis[0] if isinstance(axis, (list, tuple)) and len(axis) == 1 else axis
        if axis != -1:
            raise InputError(
                f"the output layer {layer.name!r} (Softmax) normalises axis {layer.axis}; "
                "expected -1"
            )
        return True
    return kind in _PROBED + ("Activation",) and _is(keras, layer.activation, "softmax")


def _linear(keras, layer, kind: str) -> Callable:
    """``(variables, x) -> pre-activation``, with the same ops as the layer's ``call``."""
    ops = keras.ops
    if kind == "Dense":
        # on the CPU, widths the zoo pads are padded here too (deepfault_jax.cpu_layers)
        padded = measured_faster() and layer.use_bias and pads_dense(int(layer.units))

        def dense(p, x):
            if padded and x.ndim == 2 and x.dtype == jnp.float32:
                return padded_dense(x, p["kernel"], p["bias"])
            out = ops.matmul(x, p["kernel"])
            return ops.add(out, p["bias"]) if "bias" in p else out

        return dense
    rank = int(layer.rank)
    padding = layer.padding
    causal = padding == "causal"
    pad = None
    if causal:  # Conv1D's causal padding, as in its call
        left = int(layer.dilation_rate[0]) * (int(layer.kernel_size[0]) - 1)
        pad, padding = [[0, 0], [left, 0], [0, 0]], "valid"
    strides, dilation = list(layer.strides), layer.dilation_rate
    bias_shape = (1,) * (rank + 1) + (int(layer.filters),)
    # on the CPU, a stride-1 SAME 2-D conv of one input channel runs as the zoo's does
    # (deepfault_jax.cpu_layers: the same values, measured faster there)
    shifted = (
        measured_faster() and rank == 2 and padding == "same"
        and set(strides) == {1} and set(dilation) == {1} and int(layer.groups) == 1
        and layer.use_bias and int(layer.kernel.shape[2]) == 1
    )  # fmt: skip

    def conv(p, x):
        if shifted and x.dtype == jnp.float32:
            return single_channel_conv(x, p["kernel"], p["bias"])
        if pad is not None:
            x = ops.pad(x, pad)
        out = ops.conv(x, p["kernel"], strides=strides, padding=padding,
                       dilation_rate=dilation, data_format="channels_last")  # fmt: skip
        return ops.add(out, ops.reshape(p["bias"], bias_shape)) if "bias" in p else out

    return conv


def _log_probs(p: jax.Array) -> jax.Array:
    return jnp.log(jnp.maximum(p, jnp.finfo(p.dtype).tiny))


def _steps(keras, chain, kinds, chosen, values, softmax_end) -> list[Callable]:
    """One ``(params, h, edit) -> h`` per layer of the chain; probed values go through
    ``edit(name, value)``; the last step returns log-probabilities when the model ends
    in softmax."""
    chosen = set(chosen)
    # values="post" of a layer with no activation of its own: the next activation layer's output
    post_owner: dict[str, str] = {}
    if values == "post":
        for i, layer in enumerate(chain):
            if layer.name in chosen and not _has_activation(keras, layer):
                post_owner[chain[i + 1].name] = layer.name
    last = max(i for i, kind in enumerate(kinds) if kind not in _IDENTITY)
    steps = []
    for i, (layer, kind) in enumerate(zip(chain, kinds, strict=True)):
        name, final_softmax = layer.name, softmax_end and i == last
        if kind in _IDENTITY:
            continue
        if kind in _PROBED:
            linear = _linear(keras, layer, kind)
            act = layer.activation if _has_activation(keras, layer) else None
            probed = name in chosen
            edit_pre = probed and (values == "pre" or (values == "layer" and act is None))
            edit_out = probed and act is not None and values in ("layer", "post")

            def step(params, h, edit, name=name, linear=linear, act=act, edit_pre=edit_pre,
                     edit_out=edit_out, final_softmax=final_softmax):  # fmt: skip
                pre = linear(params[name], h)
                if edit_pre:
                    pre = edit(name, pre)
                if act is None:
                    return pre
                if final_softmax and not edit_out:
                    return jax.nn.log_softmax(pre, axis=-1)
                out = act(pre)
                if edit_out:
                    out = edit(name, out)
                return _log_probs(out) if final_softmax else out

        else:
            t_names = [v.name for v in layer.trainable_variables]
            n_names = [v.name for v in layer.non_trainable_variables]
            kwargs = {"training": False} if kind == "BatchNormalization" else {}
            owner = post_owner.get(name)

            def step(params, h, edit, name=name, layer=layer, t_names=t_names, n_names=n_names,
                     kwargs=kwargs, owner=owner, final_softmax=final_softmax):  # fmt: skip
                if final_softmax and owner is None:
                    return jax.nn.log_softmax(h, axis=-1)
                p = params.get(name, {})
                out, _ = layer.stateless_call(
                    [p[n] for n in t_names], [p[n] for n in n_names], h, **kwargs
                )
                if owner is not None:
                    out = edit(owner, out)
                return _log_probs(out) if final_softmax else out

        steps.append(step)
    return steps


def _select_layers(chain, kinds, layers, output_name) -> list[str]:
    """The probed layers' names, in model order."""
    probeable = [layer.name for layer, kind in zip(chain, kinds, strict=True) if kind in _PROBED]
    kind_of = {layer.name: kind for layer, kind in zip(chain, kinds, strict=True)}
    hidden = [n for n in probeable if n != output_name]
    types = sorted({kind_of[n] for n in probeable})
    expected = f"one of {', '.join(probeable)} or a layer type ({', '.join(types)})"
    if not probeable:
        raise InputError(
            f"the model has no Dense or Conv layer to probe; expected at least one (its layers: "
            f"{', '.join(layer.name for layer in chain)})"
        )
    if layers is None:
        wanted = set(hidden)
    elif callable(layers):
        wanted = {n for n in probeable if layers(n)}
    else:
        if isinstance(layers, str):
            layers = [layers]
        wanted = set()
        for item in layers:
            item = str(item)
            if item in kind_of and kind_of[item] in _PROBED:
                wanted.add(item)
            elif item in kind_of:
                raise InputError(
                    f"layer {item!r} is a {kind_of[item]}, not a Dense or Conv layer; expected {expected}"
                )
            elif item in types:
                wanted.update(n for n in hidden if kind_of[n] == item)
            else:
                raise InputError(f"unknown layer {item!r}; expected {expected}")
    chosen = [n for n in probeable if n in wanted]
    if not chosen:
        raise InputError(f"no layer selected; expected at least one of {', '.join(probeable)}")
    return chosen


def _check_post(keras, chain, kinds, chosen) -> None:
    """values='post' needs an activation of the layer's own or right after it."""
    for i, (layer, kind) in enumerate(zip(chain, kinds, strict=True)):
        if layer.name not in chosen or _has_activation(keras, layer):
            continue
        nxt = (chain[i + 1].name, kinds[i + 1]) if i + 1 < len(chain) else None
        if nxt is None or nxt[1] not in _ACTIVATIONS:
            after = "nothing" if nxt is None else f"{nxt[0]!r} ({nxt[1]})"
            raise InputError(
                f"values='post' of layer {layer.name!r} ({kind}): it has no activation of its "
                f"own and is followed by {after}; expected an activation or an Activation, "
                "ReLU or LeakyReLU layer right after it (or use values='layer' or 'pre')"
            )


def _params(chain, kinds) -> dict[str, dict[str, jax.Array]]:
    params: dict[str, dict[str, jax.Array]] = {}
    for layer, kind in zip(chain, kinds, strict=True):
        if kind in _IDENTITY:
            continue
        variables = list(layer.trainable_variables) + list(layer.non_trainable_variables)
        own: dict[str, jax.Array] = {}
        for v in variables:
            if v.name in own:
                raise InputError(
                    f"layer {layer.name!r} has two variables named {v.name!r}; expected unique names"
                )
            own[v.name] = jnp.array(v.value, copy=True)
        if own:
            params[layer.name] = own
    return params


def keras_probe(
    model: Any,
    *,
    layers: Sequence[str] | Callable[[str], bool] | str | None = None,
    values: str = "layer",
    conv_reduce: str = "mean",
) -> tuple[Probe, dict[str, dict[str, jax.Array]], KerasModelInfo]:
    """Probes a Keras 3 model (Sequential, or a Functional chain) in pure JAX.

    Args:
      model: a built ``keras.Model`` (e.g. from :func:`load_keras_model`).
      layers: None (every Dense/Conv layer but the output layer), layer names,
        layer types (``"Dense"``, ``"Conv2D"``: every hidden layer of that type), a
        mix of both, or a predicate on layer names. The output layer is probed only
        when named.
      values: ``"layer"`` (the layer's Keras output: DeepFault's neuron),
        ``"pre"`` (before its built-in activation) or ``"post"`` (after its own or
        the next layer's activation); see the module docstring.
      conv_reduce: ``"mean"``, ``"max"`` or ``"none"``.

    Returns:
      ``(probe, params, info)``: the :class:`Probe` (``probe.fn(params, x)`` returns
      ``(logits, {layer: float32[batch, units]})``, jit-able; ``probe.gated`` runs
      the model with gates), its parameters ``{layer name: {variable name:
      jnp array}}`` (copies of the model's variables), and a :class:`KerasModelInfo`.
      Probes of the same model object with the same options are equal (one compile).
    """
    keras = require_keras()
    if values not in KERAS_VALUES:
        raise InputError(f"values must be one of {', '.join(KERAS_VALUES)}; got {values!r}")
    if conv_reduce not in CONV_REDUCTIONS:
        raise InputError(
            f"conv_reduce must be one of {', '.join(CONV_REDUCTIONS)}; got {conv_reduce!r}"
        )
    chain = _chain(keras, model)
    if not chain:
        raise InputError(f"model {model.name!r} has no layers; expected Dense or Conv layers")
    kinds = [_kind(keras, layer) for layer in chain]
    for layer, kind in zip(chain, kinds, strict=True):
        _check_layer(keras, layer, kind)
    input_shape = tuple(model.inputs[0].shape[1:])
    if any(d is None for d in input_shape):
        raise InputError(
            f"model {model.name!r} takes inputs of shape {list(input_shape)}; expected a "
            "fixed shape (no None besides the batch axis)"
        )
    output_shape = tuple(model.outputs[0].shape)
    if len(output_shape) != 2 or output_shape[-1] is None:
        raise InputError(
            f"model {model.name!r} outputs shape {list(output_shape)}; expected [batch, classes]"
        )
    probeable = [layer.name for layer, kind in zip(chain, kinds, strict=True) if kind in _PROBED]
    output_name = probeable[-1] if probeable else None
    chosen = _select_layers(chain, kinds, layers, output_name)
    if values == "post":
        _check_post(keras, chain, kinds, chosen)
    last = [i for i, kind in enumerate(kinds) if kind not in _IDENTITY]
    softmax_end = bool(last) and _ends_in_softmax(keras, chain[last[-1]], kinds[last[-1]])
    steps = _steps(keras, chain, kinds, chosen, values, softmax_end)

    def raw_gated(params, x, edit):
        h = jnp.asarray(x, jnp.float32)
        for step in steps:
            h = step(params, h, edit)
        return h

    def raw_fn(params, x):
        found = {}

        def record(name, value):
            found[name] = value
            return value

        logits = raw_gated(params, x, record)
        return logits, {name: found[name] for name in chosen}

    params = _params(chain, kinds)
    key = ("keras", model, tuple(chosen), values)
    probe = _finish(raw_fn, params, input_shape, None, lambda a: a, conv_reduce, values,
                    None, raw_gated, key)  # fmt: skip
    kind_of = {layer.name: kind for layer, kind in zip(chain, kinds, strict=True)}
    info = KerasModelInfo(
        name=str(model.name),
        input_shape=tuple(int(d) for d in input_shape),
        num_classes=int(output_shape[-1]),
        ends_in_softmax=bool(softmax_end),
        layers=tuple(chosen),
        layer_types=tuple(kind_of[n] for n in chosen),
        values=values,
        chain=tuple((layer.name, kind) for layer, kind in zip(chain, kinds, strict=True)),
    )
    return probe, params, info
