"""deepfault-jax: DeepFault fault localization for deep neural networks, in JAX.

The public API, by stage of the pipeline (see each module for details):

- data (:mod:`deepfault_jax.data`): :func:`load_dataset`, :func:`make_dataset`,
  :class:`Dataset`, :func:`iterate_batches`, :func:`shuffled_batches`,
  :class:`Batch`, :func:`read_idx`, :func:`available_datasets`.
- models (:mod:`deepfault_jax.zoo`): :func:`create_model`, :class:`Model`,
  :func:`init_params`, :func:`train`, :class:`TrainResult`, :func:`accuracy`,
  :func:`predict`, :func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`load_or_train`.
- probes (:mod:`deepfault_jax.probe`): :func:`model_probe`, :func:`linen_probe`,
  :func:`nnx_probe`, :func:`function_probe`, :class:`Probe`, :class:`NeuronIndex`.
- spectra (:mod:`deepfault_jax.spectrum`): :class:`Spectrum`, :class:`Counts`,
  :func:`init_spectrum`, :func:`update_spectrum`, :func:`accumulate_spectrum`,
  :func:`compute_spectrum`, :func:`merge_spectra`, :func:`save_spectrum`,
  :func:`load_spectrum`, :func:`data_mesh`, :class:`SpectrumMetric`,
  :class:`Attribution`, :class:`AttributionSums`.
- localization (:mod:`deepfault_jax.measures`, :mod:`deepfault_jax.localize`):
  :func:`get_measure`, :func:`measure_names`, :func:`suspiciousness`,
  :func:`top_k_neurons`, :func:`suspicious_neurons`, :func:`random_neurons`,
  :func:`ranking_table`, :func:`measure_agreement`, :func:`measure_kind`,
  :func:`exact_ablation`, :class:`Ablation`, :func:`ablation_scores`.
- planted faults (:mod:`deepfault_jax.faults`): :func:`plant_faults`,
  :class:`PlantedFault`, :data:`FAULT_KINDS`.
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
from deepfault_jax.faults import FAULT_KINDS, PlantedFault, plant_faults
from deepfault_jax.localize import (
    Ablation,
    ablation_scores,
    exact_ablation,
    random_neurons,
    ranking_table,
    suspicious_neurons,
)
from deepfault_jax.localize import agreement as measure_agreement
from deepfault_jax.localize import scores as suspiciousness
from deepfault_jax.localize import top_k as top_k_neurons
from deepfault_jax.measures import get as get_measure
from deepfault_jax.measures import kind as measure_kind
from deepfault_jax.measures import names as measure_names
from deepfault_jax.probe import (
    NeuronIndex,
    Probe,
    function_probe,
    linen_probe,
    model_probe,
    nnx_probe,
)
from deepfault_jax.spectrum import (
    Attribution,
    AttributionSums,
    Counts,
    Spectrum,
    SpectrumMetric,
    compute_spectrum,
    data_mesh,
    init_spectrum,
    load_spectrum,
    save_spectrum,
)
from deepfault_jax.spectrum import accumulate as accumulate_spectrum
from deepfault_jax.spectrum import merge as merge_spectra
from deepfault_jax.spectrum import update as update_spectrum
from deepfault_jax.zoo import (
    Model,
    TrainResult,
    accuracy,
    create_model,
    default_epochs,
    init_params,
    load_checkpoint,
    load_or_train,
    package_versions,
    predict,
    save_checkpoint,
    train,
)

__version__ = "0.1.0"

__all__ = [
    "FAULT_KINDS",
    "Ablation",
    "Attribution",
    "AttributionSums",
    "PlantedFault",
    "ablation_scores",
    "exact_ablation",
    "measure_kind",
    "plant_faults",
    "accuracy",
    "Batch",
    "Counts",
    "Dataset",
    "Model",
    "NeuronIndex",
    "Probe",
    "Spectrum",
    "SpectrumMetric",
    "TrainResult",
    "accumulate_spectrum",
    "available_datasets",
    "compute_spectrum",
    "data_mesh",
    "function_probe",
    "get_measure",
    "init_spectrum",
    "linen_probe",
    "load_or_train",
    "load_spectrum",
    "merge_spectra",
    "model_probe",
    "nnx_probe",
    "save_spectrum",
    "update_spectrum",
    "create_model",
    "default_epochs",
    "init_params",
    "iterate_batches",
    "load_checkpoint",
    "load_dataset",
    "make_dataset",
    "measure_agreement",
    "measure_names",
    "package_versions",
    "predict",
    "random_neurons",
    "ranking_table",
    "read_idx",
    "save_checkpoint",
    "shuffled_batches",
    "suspicious_neurons",
    "suspiciousness",
    "top_k_neurons",
    "train",
]
