"""deepfault-jax: DeepFault fault localization for deep neural networks, in JAX.

The public API, by stage of the pipeline (see each module for details):

- data (:mod:`deepfault_jax.data`): :func:`load_dataset`, :func:`make_dataset`,
  :class:`Dataset`, :func:`iterate_batches`, :func:`shuffled_batches`,
  :class:`Batch`, :func:`read_idx`, :func:`available_datasets`.
- models (:mod:`deepfault_jax.zoo`): :func:`create_model`, :class:`Model`,
  :func:`init_params`, :func:`train`, :class:`TrainResult`, :func:`evaluate`,
  :func:`predict`, :func:`save_checkpoint`, :func:`load_checkpoint`.
"""

from deepfault_jax.data import (
    Batch,
    Dataset,
    available_datasets,
    iterate_batches,
    load_dataset,
    make_dataset,
    read_idx,
    shuffled_batches,
)
from deepfault_jax.zoo import (
    Model,
    TrainResult,
    create_model,
    default_epochs,
    evaluate,
    init_params,
    load_checkpoint,
    package_versions,
    predict,
    save_checkpoint,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "Dataset",
    "Model",
    "TrainResult",
    "available_datasets",
    "create_model",
    "default_epochs",
    "evaluate",
    "init_params",
    "iterate_batches",
    "load_checkpoint",
    "load_dataset",
    "make_dataset",
    "package_versions",
    "predict",
    "read_idx",
    "save_checkpoint",
    "shuffled_batches",
    "train",
]
