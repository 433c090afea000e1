"""deepfault-jax: DeepFault fault localization for deep neural networks, in JAX.

The public API, by stage of the pipeline; every name is its module's own name
(see each module for details):

- errors (:mod:`deepfault_jax.errors`): :class:`InputError`, :class:`InputTypeError`.
- data (:mod:`deepfault_jax.data`): :func:`load_dataset`, :func:`make_dataset`,
  :class:`Dataset`, :func:`iterate_batches`, :func:`shuffled_batches`,
  :class:`Batch`, :func:`read_idx`, :func:`available_datasets`.
- models (:mod:`deepfault_jax.zoo`, :mod:`deepfault_jax.training`,
  :mod:`deepfault_jax.checkpoints`): :func:`create_model`, :class:`Model`,
  :func:`init_params`, :func:`train`, :class:`TrainResult`, :func:`accuracy`,
  :func:`predict`, :func:`save_checkpoint`, :func:`load_checkpoint`,
  :func:`load_or_train`, :func:`default_epochs`, :func:`package_versions`.
- probes (:mod:`deepfault_jax.probe`): :func:`model_probe`, :func:`linen_probe`,
  :func:`nnx_probe`, :func:`function_probe`, :class:`Probe`, :class:`NeuronIndex`.
- spectra (:mod:`deepfault_jax.spectrum`, :mod:`deepfault_jax.attribution`,
  :mod:`deepfault_jax.streaming`, :mod:`deepfault_jax.spectrum_io`,
  :mod:`deepfault_jax.metrics`): :class:`Spectrum`, :class:`Counts`,
  :func:`init_spectrum`, :func:`update_spectrum`, :func:`merge_spectra`,
  :func:`layer_summary`,
  :class:`Attribution`, :class:`AttributionSums`, :func:`accumulate_spectrum`,
  :func:`compute_spectrum`, :func:`data_mesh`, :func:`save_spectrum`,
  :func:`load_spectrum`, :class:`SpectrumMetric`.
- localization (:mod:`deepfault_jax.measures`, :mod:`deepfault_jax.localize`,
  :mod:`deepfault_jax.ablation`): :func:`get_measure`, :func:`measure_names`,
  :func:`measure_kind`, :func:`suspiciousness`, :func:`top_k_neurons`,
  :func:`suspicious_neurons`, :func:`random_neurons`, :func:`ranking_table`,
  :func:`measure_agreement`, :func:`exact_ablation`, :class:`Ablation`,
  :func:`ablation_scores`.
- one entry point for every localizer (:mod:`deepfault_jax.localizers`):
  :func:`localize_neurons`, :func:`localizer_names`, :func:`localizer_info`,
  :data:`DEFAULT_LOCALIZER`, :class:`Evidence`.
- synthesis and evaluation (:mod:`deepfault_jax.synthesis`,
  :mod:`deepfault_jax.evaluate`): :func:`make_synthesizer`, :func:`synthesize`,
  :class:`Synthesizer`, :class:`SynthesisState`, :func:`evaluate_synthesis`.
- planted faults (:mod:`deepfault_jax.faults`, :mod:`deepfault_jax.faultbench`):
  :func:`plant_faults`, :class:`PlantedFault`, :data:`FAULT_KINDS`,
  :class:`FaultbenchConfig`, :func:`run_faultbench`.
- repair (:mod:`deepfault_jax.repair`, :mod:`deepfault_jax.repair_job`): :func:`neuron_view`,
  :func:`layer_view`, :class:`View`, :func:`fine_tune`, :class:`Fit`,
  :func:`compare_repairs`, :func:`repair_metrics`, :class:`RepairConfig`, :func:`run_repair`,
  and the search-based repair (:mod:`deepfault_jax.repair_search`): :func:`search_repair`,
  :class:`SearchFit`.
- the whole job (:mod:`deepfault_jax.pipeline`, :mod:`deepfault_jax.report`):
  :class:`RunConfig`, :func:`run`, and its typed report :class:`RunReport`
  (:class:`Selection`, :class:`MeasureResult`, :class:`RandomRun`).
"""

from deepfault_jax.ablation import Ablation, ablation_scores, exact_ablation
from deepfault_jax.attribution import Attribution, AttributionSums
from deepfault_jax.checkpoints import (
    load_checkpoint,
    load_or_train,
    package_versions,
    save_checkpoint,
)
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
from deepfault_jax.errors import InputError, InputTypeError
from deepfault_jax.evaluate import evaluate_synthesis
from deepfault_jax.faultbench import FaultbenchConfig, run_faultbench
from deepfault_jax.faults import FAULT_KINDS, PlantedFault, plant_faults
from deepfault_jax.keras_models import KerasModelInfo, keras_probe, load_keras_model
from deepfault_jax.localize import (
    measure_agreement,
    random_neurons,
    ranking_table,
    suspicious_neurons,
    suspiciousness,
    top_k_neurons,
)
from deepfault_jax.localizers import (
    DEFAULT_LOCALIZER,
    Evidence,
    localize_neurons,
    localizer_info,
    localizer_names,
)
from deepfault_jax.measures import get_measure, measure_kind, measure_names
from deepfault_jax.metrics import SpectrumMetric
from deepfault_jax.pipeline import RunConfig, run
from deepfault_jax.probe import (
    NeuronIndex,
    Probe,
    function_probe,
    linen_probe,
    model_probe,
    nnx_probe,
)
from deepfault_jax.repair import (
    Fit,
    View,
    compare_repairs,
    fine_tune,
    layer_view,
    neuron_view,
    repair_metrics,
)
from deepfault_jax.repair_job import RepairConfig, run_repair
from deepfault_jax.repair_search import SearchFit, search_repair
from deepfault_jax.report import MeasureResult, RandomRun, RunReport, Selection
from deepfault_jax.sources import ArraySource, Source, open_source
from deepfault_jax.spectrum import (
    Counts,
    Spectrum,
    init_spectrum,
    layer_summary,
    merge_spectra,
    update_spectrum,
)
from deepfault_jax.spectrum_io import load_spectrum, save_spectrum
from deepfault_jax.streaming import (
    accumulate_spectrum,
    compute_spectrum,
    data_mesh,
    memory_estimate,
    stream_spectrum,
)
from deepfault_jax.synthesis import SynthesisState, Synthesizer, make_synthesizer, synthesize
from deepfault_jax.training import TrainResult, train
from deepfault_jax.zoo import (
    Model,
    accuracy,
    create_model,
    default_epochs,
    init_params,
    predict,
)

__version__ = "0.1.0"

__all__ = [
    # errors
    "InputError",
    "InputTypeError",
    # data
    "Batch",
    "Dataset",
    "available_datasets",
    "iterate_batches",
    "load_dataset",
    "make_dataset",
    "read_idx",
    "shuffled_batches",
    # models
    "Model",
    "TrainResult",
    "accuracy",
    "create_model",
    "default_epochs",
    "init_params",
    "load_checkpoint",
    "load_or_train",
    "package_versions",
    "predict",
    "save_checkpoint",
    "train",
    # probes
    "NeuronIndex",
    "Probe",
    "function_probe",
    "KerasModelInfo",
    "keras_probe",
    "load_keras_model",
    "linen_probe",
    "model_probe",
    "nnx_probe",
    # spectra
    "Attribution",
    "AttributionSums",
    "Counts",
    "Spectrum",
    "SpectrumMetric",
    "accumulate_spectrum",
    "compute_spectrum",
    "open_source",
    "stream_spectrum",
    "memory_estimate",
    "Source",
    "ArraySource",
    "data_mesh",
    "init_spectrum",
    "layer_summary",
    "load_spectrum",
    "merge_spectra",
    "save_spectrum",
    "update_spectrum",
    # localization
    "Ablation",
    "ablation_scores",
    "exact_ablation",
    "get_measure",
    "measure_agreement",
    "measure_kind",
    "measure_names",
    "random_neurons",
    "ranking_table",
    "suspicious_neurons",
    "suspiciousness",
    "top_k_neurons",
    "DEFAULT_LOCALIZER",
    "Evidence",
    "localize_neurons",
    "localizer_info",
    "localizer_names",
    # synthesis and evaluation
    "SynthesisState",
    "Synthesizer",
    "evaluate_synthesis",
    "make_synthesizer",
    "synthesize",
    # planted faults
    "FAULT_KINDS",
    "FaultbenchConfig",
    "PlantedFault",
    "plant_faults",
    # repair
    "neuron_view",
    "layer_view",
    "View",
    "fine_tune",
    "Fit",
    "compare_repairs",
    "repair_metrics",
    "RepairConfig",
    "run_repair",
    "search_repair",
    "SearchFit",
    "run_faultbench",
    # the whole job
    "MeasureResult",
    "RandomRun",
    "RunConfig",
    "RunReport",
    "Selection",
    "run",
]
