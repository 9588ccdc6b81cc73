"""The typed run configuration: every setting of a run, its default, bounds and description,
declared once. Keras-free, so flows, the CLI and the benchmarks import it cheaply.

- One pydantic model per stage: `DataConfig` (which rows), `FetchConfig`, `SplitConfig`,
  `TrainingPlan` (which architectures, at what size), `TuningPlan`; `RunConfig` composes them
  with the run-wide `mode`, `seed` and `budget_minutes`. `TrainConfig` is the full recipe of one
  architecture's training (the `derm-train` flow's and the tuner's unit of work).
- The flows keep flat parameters (`-p image_size=64`). Each flat parameter is a field of one
  stage model, with a unique name, so `RunConfig.from_parameters(**flat)` and
  `RunConfig.parameters()` convert both ways. A flow declares a parameter as
  `image_size: ImageSize = RUN_DEFAULTS["image_size"]`: the annotation carries the bounds, the
  model the default, and `describe_parameters` writes the model's descriptions into the flow's
  docstring, where Prefect reads them for the UI's run form. A unit test checks that every
  flow signature agrees with these models.
- A run stores its resolved config with `RunConfig.model_dump()`.
"""

from __future__ import annotations

import inspect
from typing import Annotated, Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo

DEFAULT_CSV_URL = "https://raw.githubusercontent.com/mattgroh/fitzpatrick17k/main/fitzpatrick17k.csv"

# The registry of architectures lives in `dermflow.modeling.models` (Keras); a unit test keeps
# this Literal equal to it, so the UI offers a dropdown and a typo fails before any work starts.
ArchitectureName = Literal[
    "baseline_cnn",
    "vgg16",
    "vgg19",
    "resnet50v2",
    "inception_v3",
    "efficientnetv2_b0",
    "convnext_tiny",
]
# The five architectures the student report compared.
REPORT_ARCHITECTURES: tuple[str, ...] = ("baseline_cnn", "vgg16", "vgg19", "resnet50v2", "inception_v3")

Mode = Literal["full", "fetch", "refetch", "retrain"]
TunerName = Literal["random", "hyperband", "bayesian"]
TaskRunnerName = Literal["auto", "processes", "threads", "dask"]
OptimizerName = Literal["adam", "adamw", "sgd", "rmsprop"]
LRScheduleName = Literal["cosine", "constant"]

DEFAULT_EPOCHS = 30  # the final training's epochs when neither `epochs` nor a budget is given
MAX_EPOCHS = 1000  # the cap under a time budget (the learning rate anneals by the deadline)
# Hamming distance (of 64 bits) at or under which two pHashes count as the same picture.
# Measured on atlas20 (tests/unit/test_dedup_atlas.py): copies re-encoded at JPEG q30 or
# halved in size all land within 8 bits, copies cropped by 4% in 91%, 97% overall (6 bits:
# 91% overall). Only 8 of 2.15M pairs of distinct atlas images are within 8 bits; looked at,
# 4 are the same lesion re-shot, 4 different lesions with the same composition.
DEFAULT_DUP_THRESHOLD = 8
DEFAULT_TUNING_SHARE = 0.35  # of the time left when tuning starts; the final training gets the rest

# --- the parameters' types: bounds here, descriptions here, defaults in the models ----------
Csv = Annotated[str, Field(description=(
    "The dataset CSV in the Fitzpatrick 17k schema: an https URL, a local path on the worker, "
    "or an s3://bucket/key URI. Default: the published Fitzpatrick 17k CSV."))]
Images = Annotated[str | None, Field(description=(
    "The dataset's images as you have them (the dataset's maintainers send an archive): a "
    ".zip, .tar, .tar.gz or .tgz (a local path, s3:// or https:// URI), a local folder, or an "
    "s3://bucket/prefix/. Files named <md5hash>.<image extension>, in any folder. Rows found "
    "there are imported; only the rest are fetched by URL. null (empty): fetch every row by URL."))]
LimitPerLabel = Annotated[int | None, Field(ge=1, description=(
    "Rows kept per label, at most (a seeded sample), a whole number >= 1. null (empty): every row."))]
Seed = Annotated[int, Field(description=(
    "Integer seed of the row sample, the split and training; the same seed and data give the same split."))]
BudgetMinutes = Annotated[float | None, Field(gt=0, description=(
    "Wall-clock bound of the whole run in minutes (> 0), from its start, fetching included; tuning gets "
    f"{DEFAULT_TUNING_SHARE:.0%} of what is left when it starts (in trial slots of at most a third), "
    "the final training all the time then left, its learning rate annealed by the deadline; its "
    "evaluation, the registration and the report follow the deadline (seconds). null (empty): no bound."))]
ModeParam = Annotated[Mode, Field(description=(
    "One of full (everything: fetch, split, train, register, promote if better, report), fetch "
    "(fetch only), refetch (retry the failed rows of the latest fetch), retrain (fetch what is "
    "new, reuse what is unchanged, promote only a better model)."))]
ConfigName = Annotated[str | None, Field(description=(
    "A saved run configuration whose parameters this run takes: the name of one stored with "
    "`dermflow schedule set` (config/<name>.json in the bucket). null (empty): none, except in "
    "mode retrain, which then takes the configuration of the run that produced the current "
    "champion (the defaults when there is no champion yet). A parameter given to the run "
    "explicitly wins over the saved configuration."))]
HostConcurrency = Annotated[int, Field(ge=1, le=256, description=(
    "Requests in flight per image host, for the whole fetch: 1 to 256."))]
HostRateLimit = Annotated[float | None, Field(gt=0, description=(
    "Requests per second per image host (> 0), for the whole fetch. null (empty): no limit."))]
ShardSize = Annotated[int, Field(ge=1, le=10000, description=(
    "Rows per fetch task run, 1 to 10000 (a shard is retried as a whole)."))]
TaskRunner = Annotated[TaskRunnerName, Field(description=(
    "Runner of the import and fetch shards: auto (processes where they win back the pool's start: "
    "on 2 cores never; by URL from about 2,800 rows on 3 cores, 1,900 on 4; an import from about "
    "4,700 on 3 cores, 3,000 on 4; else "
    "threads), processes (Prefect's process pool, one per core), threads (in the "
    "flow's process) or dask (a Dask cluster; see dask_address)."))]
DaskAddress = Annotated[str | None, Field(description=(
    "tcp://host:8786, the scheduler of an existing Dask cluster (used with task_runner=dask). "
    "null (empty): a local Dask cluster."))]
DupThreshold = Annotated[int, Field(ge=0, le=64, description=(
    "Bits, 0 to 64: images whose 64-bit perceptual hashes differ by at most this many bits are "
    "near-duplicates and stay in one split; 0: only identical hashes."))]
ExcludeWronglyLabelled = Annotated[bool, Field(description=(
    "true: leave out rows whose qc column says '3 Wrongly labelled'; false: keep them."))]
DropSmallLabels = Annotated[bool, Field(description=(
    "true: leave out labels with too few images to split (listed in the split summary); "
    "false: such labels end the run with an error that names them."))]
ImageSize = Annotated[int, Field(ge=32, le=1024, description=(
    "Square input size in pixels, 32 to 1024 (some architectures raise it to their minimum, "
    "e.g. inception_v3 to 75)."))]
BatchSize = Annotated[int, Field(ge=1, le=1024, description="Images per training batch, 1 to 1024.")]
Weights = Annotated[str, Field(description=(
    "Backbone initialisation: 'imagenet' (transfer learning; downloads the Keras weights once), "
    "'none' (from scratch), or the path of a weights file on the worker."))]
Architectures = Annotated[list[ArchitectureName], Field(min_length=1, description=(
    "Architectures to train, each as its own derm-train subflow (at least one): any of "
    "baseline_cnn, vgg16, vgg19, resnet50v2, inception_v3, efficientnetv2_b0, convnext_tiny."))]
Epochs = Annotated[int | None, Field(ge=1, le=MAX_EPOCHS, description=(
    f"Final training epochs per architecture, 1 to {MAX_EPOCHS}. null (empty): {DEFAULT_EPOCHS}, "
    "or with budget_minutes as many as fit, the learning rate annealed by the deadline."))]
TrainEpochs = Annotated[int, Field(ge=1, le=MAX_EPOCHS, description=(
    "Epochs of this training, both phases together."))]
Tune = Annotated[bool, Field(description=(
    "true: run a keras-tuner search per architecture first, then train with its best trial; "
    "false: train with the default recipe."))]
Tuner = Annotated[TunerName, Field(description=(
    "keras-tuner algorithm (used with tune=true): random, hyperband or bayesian."))]
MaxTrials = Annotated[int, Field(ge=1, le=1000, description=(
    "Trials per architecture's search, at most: 1 to 1000 (used with tune=true)."))]
TuneWorkers = Annotated[int, Field(ge=1, le=64, description=(
    "Workers of a distributed search, 1 to 64 (derm-tune/worker runs, each holding a gpu slot); "
    "1: the search runs in the flow's process."))]

RequireGpu = Annotated[bool, Field(description=(
    "Fail early, with a clear message, when a trainer sees no GPU instead of training on the CPU."))]
DataParallel = Annotated[bool, Field(description=(
    "When there are more GPUs than architectures, train each architecture on several GPUs at "
    "once (Keras DataParallel under JAX); otherwise one GPU per architecture."))]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- the stages of a run --------------------------------------------------------------------
class DataConfig(_Section):
    """Which rows of which CSV."""

    csv: Csv = DEFAULT_CSV_URL
    limit_per_label: LimitPerLabel = None
    images: Images = None


class FetchConfig(_Section):
    """How images are fetched by URL."""

    host_concurrency: HostConcurrency = 16
    host_rate_limit: HostRateLimit = None
    shard_size: ShardSize = 256
    task_runner: TaskRunner = "auto"
    dask_address: DaskAddress = None


class SplitConfig(_Section):
    """How the 70/15/15 split groups and filters rows."""

    dup_threshold: DupThreshold = DEFAULT_DUP_THRESHOLD
    exclude_wrongly_labelled: ExcludeWronglyLabelled = True
    drop_small_labels: DropSmallLabels = False


class ModelInput(_Section):
    """What every training and search shares: input size, batch size, initial weights."""

    image_size: ImageSize = 256
    batch_size: BatchSize = 32
    weights: Weights = "imagenet"


class TrainingPlan(ModelInput):
    """Which architectures a run trains, and for how long."""

    architectures: Architectures = Field(default_factory=lambda: list(REPORT_ARCHITECTURES))
    epochs: Epochs = None
    require_gpu: RequireGpu = False
    data_parallel: DataParallel = False


class SearchOptions(_Section):
    """The search algorithm and its size (shared by a run's plan and one search's spec)."""

    tuner: Tuner = "random"
    max_trials: MaxTrials = 10


class TuningPlan(SearchOptions):
    """Whether and how a run tunes before its final training."""

    tune: Tune = False
    tune_workers: TuneWorkers = 1


class TrainConfig(ModelInput):
    """Everything that decides one architecture's training (all JSON-able)."""

    architecture: ArchitectureName = Field("baseline_cnn", description="The architecture to train.")
    epochs: TrainEpochs = DEFAULT_EPOCHS
    seed: Seed = 42
    learning_rate: float = Field(1e-3, gt=0, description="baseline_cnn training and the head warm-up")
    fine_tune_learning_rate: float = Field(1e-5, gt=0)
    warmup_epochs: int = Field(3, ge=0)
    fine_tune_fraction: float = Field(0.3, ge=0, le=1, description="top share of backbone layers unfrozen")
    fine_tune_blocks: int | None = Field(None, ge=1, description="if set: unfreeze the last N blocks instead")
    class_weights: bool = True
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # cosine: linear warm-up, then cosine decay to ~0 by the end of each phase (its last epoch or
    # the deadline, whichever comes first); constant: the phase's rate throughout.
    lr_schedule: LRScheduleName = "cosine"
    lr_warmup_fraction: float = Field(0.05, ge=0, lt=1)
    optimizer: OptimizerName = "adam"
    weight_decay: float = Field(1e-4, ge=0, description="adamw only")
    patience: int = Field(5, ge=1, description="epochs without val weighted F1 improvement (within a phase); "
                          "only once the learning-rate schedule has annealed")
    tta: bool = Field(True, description="test-time augmentation in the held-out evaluation: "
                      "probabilities averaged with the horizontally flipped images")
    # Measured (bench/README.md, issue 17): with the schedule annealed to the deadline, the best
    # validation epoch (late in the tail) beat the tail average on held-out images in 3 of 3
    # seeds (mean weighted F1 0.427 vs 0.419); both are scored and recorded on every training.
    model_choice: Literal["average", "best_epoch"] = Field(
        "best_epoch", description="the model kept: the single best validation epoch, or the weights "
        "averaged over the schedule's annealed tail")
    deadline: float | None = Field(None, description="unix time: stop cleanly, keeping the best epoch so far")
    head_width: int = Field(256, ge=1)
    dropout: float = Field(0.25, ge=0, lt=1)
    augment: bool = True
    edge_mask: float = Field(0.0, ge=0, lt=0.5, description="share of the image height at the bottom edge "
                             "(where the image host's watermark is) set to the image's mean colour, in "
                             "training and inference; 0: none")
    arch_options: dict[str, Any] = Field(default_factory=dict)
    min_train_images: int = Field(10, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    mixed_precision: bool | None = Field(None, description="None: only when a GPU is present")
    jit_compile: bool | None = Field(None, description="None: XLA when a GPU is present (always under JAX)")
    require_gpu: RequireGpu = False
    data_parallel: DataParallel = False

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Validated; an unknown field is an error naming it."""
        return cls.model_validate(dict(values))


# --- the run --------------------------------------------------------------------------------
class RunConfig(_Section):
    """A whole `derm` run: the stages plus the run-wide settings."""

    mode: ModeParam = "full"
    config: ConfigName = None
    seed: Seed = 42
    budget_minutes: BudgetMinutes = None
    data: DataConfig = Field(default_factory=DataConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    training: TrainingPlan = Field(default_factory=TrainingPlan)
    tuning: TuningPlan = Field(default_factory=TuningPlan)

    @classmethod
    def sections(cls) -> dict[str, type[_Section]]:
        return {name: info.annotation for name, info in cls.model_fields.items()
                if isinstance(info.annotation, type) and issubclass(info.annotation, _Section)}

    @classmethod
    def parameter_fields(cls) -> dict[str, FieldInfo]:
        """Every flat parameter (the flows' names) and its field, in a stable order."""
        fields = {name: info for name, info in cls.model_fields.items() if name not in cls.sections()}
        for section in cls.sections().values():
            fields.update(section.model_fields)
        return fields

    @classmethod
    def from_parameters(cls, **flat: Any) -> "RunConfig":
        """Validate flat flow parameters into a RunConfig (unknown names are an error)."""
        sections = cls.sections()
        nested: dict[str, Any] = {name: {} for name in sections}
        for name, value in flat.items():
            owner = next((s for s, model in sections.items() if name in model.model_fields), None)
            if owner is None:
                nested[name] = value
            else:
                nested[owner][name] = value
        return cls.model_validate(nested)

    def parameters(self) -> dict[str, Any]:
        """The flat parameters of this config (the inverse of `from_parameters`)."""
        flat = {name: getattr(self, name) for name in type(self).model_fields if name not in self.sections()}
        for name in self.sections():
            flat.update(getattr(self, name).model_dump())
        return flat

    def final_epochs(self) -> int:
        """The final training's epochs: as given; else the default, or under a time budget as
        many as the budget allows (`MAX_EPOCHS` as the cap)."""
        if self.training.epochs is not None:
            return self.training.epochs
        return MAX_EPOCHS if self.budget_minutes else DEFAULT_EPOCHS

    def deadline(self, started: float) -> float | None:
        """Unix time by which the run must end, or None without a budget."""
        return started + self.budget_minutes * 60 if self.budget_minutes else None


RUN_DEFAULTS: dict[str, Any] = RunConfig().parameters()
TRAIN_DEFAULTS = TrainConfig()


def field_descriptions(model: type[BaseModel]) -> dict[str, str]:
    """Each (flat) parameter's description in `model`."""
    fields = model.parameter_fields() if issubclass(model, RunConfig) else model.model_fields
    return {name: info.description for name, info in fields.items() if info.description}


def describe_parameters(*models: type[BaseModel], **extra: str) -> Callable[[Callable], Callable]:
    """Decorator (under `@flow`): appends an `Args:` section to the function's docstring with
    each parameter's description from `models` (the first that has it), or from `extra` for
    flow-only parameters such as keys. Prefect reads it for the UI's run form and for
    `prefect deployment inspect`."""

    def decorate(fn: Callable) -> Callable:
        descriptions: dict[str, str] = {}
        for model in reversed(models):
            descriptions.update(field_descriptions(model))
        descriptions.update(extra)
        names = list(inspect.signature(fn).parameters)
        missing = [name for name in names if name not in descriptions]
        if missing:
            raise TypeError(f"{fn.__name__}: no description for parameter(s) {missing}")
        args = "\n".join(f"    {name}: {' '.join(descriptions[name].split())}" for name in names)
        fn.__doc__ = f"{inspect.getdoc(fn) or fn.__name__}\n\nArgs:\n{args}\n"
        return fn

    return decorate
