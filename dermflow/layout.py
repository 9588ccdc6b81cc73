"""The bucket layout: the only module that spells a bucket key.

Every other module asks this one for keys and prefixes, so the layout below is true by
construction (a test fails if a key literal appears anywhere else). Local cache paths are not
bucket keys and are not spelled here.

```
images/<md5hash>                          original image bytes (complete, decodable)
private/datasets/<fingerprint12>.csv      ingested dataset rows, their URLs unredacted (refetch)
private/runs/<run_id>/config.json         a run's configuration unredacted (replay), if it differs
private/runs/<run_id>/fetch/<stage>-<NNNNN>.rows.json | .results.json
                                          a fetch's shards, handed between task runs (deleted after)
private/inputs/<sha256-16>/<name>[/...]   a run's local input (csv, images, weights) staged for other hosts
manifests/fetch.csv                       latest fetch manifest; manifests/fetch.json: its dataset
manifests/fetch/<run_id>.csv              fetch manifest history
manifests/split-<hash12>.csv | .json      split assignment and its summary
runs/<run_id>/params.json | metrics.json | report.html | figures/<name>.png
runs/<run_id>/models/<arch>/model.keras | metrics.json | history.json | params.json | predictions.npz
runs/<run_id>/checkpoints/<arch>/epoch-<NNN>.keras | state.json
runs/<run_id>/active.json                 marker while the run is in progress (retention skips it)
tuning/<tuning_id>/...                    keras-tuner project directory
registry/models/<run_id>/<arch>.json      registered model
registry/champions/<label_set>.json       copy of the champion for readers, may lag (+ legacy .history.jsonl)
registry/promotions/<label_set>/<seq>.json promotion records: created once each, the last is the champion
registry/trainings/<key>.json             outcome of a training, for retrain reuse
config/<name>.json                        a named run configuration (`dermflow schedule set`)
```
"""

from __future__ import annotations

import re

IMAGES_PREFIX = "images/"
MANIFESTS_PREFIX = "manifests/"
RUNS_PREFIX = "runs/"
TUNING_PREFIX = "tuning/"
REGISTRY_PREFIX = "registry/"
# Objects that may hold credentials (URLs as the user gave them): only the pipeline reads them
# back; they are never presigned, shown in a report, logged or published as an artifact.
PRIVATE_PREFIX = "private/"
# Named run configurations a retrain can take its parameters from (`dermflow schedule set`).
CONFIGS_PREFIX = "config/"
_CONFIG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
REGISTERED_MODELS_PREFIX = REGISTRY_PREFIX + "models/"
CHAMPIONS_PREFIX = REGISTRY_PREFIX + "champions/"
TRAININGS_PREFIX = REGISTRY_PREFIX + "trainings/"
PROMOTIONS_PREFIX = REGISTRY_PREFIX + "promotions/"

FETCH_MANIFEST_KEY = MANIFESTS_PREFIX + "fetch.csv"
# Which dataset the latest manifest describes: refetch needs its real (unredacted) URLs.
FETCH_STATE_KEY = MANIFESTS_PREFIX + "fetch.json"

MODEL_FILE = "model.keras"
SALIENCY_FILE = "saliency.npz"  # Grad-CAM maps of the report's example images, by the trainer
CHAMPION_SUFFIX = ".json"
CHAMPION_HISTORY_SUFFIX = ".history.jsonl"
_CHECKPOINT_NAME = re.compile(r"^epoch-(\d+)\.keras$")


# --- images ---------------------------------------------------------------------------------
def image_key(md5hash: str) -> str:
    return f"{IMAGES_PREFIX}{md5hash}"


def md5_of_image_key(key: str) -> str | None:
    """The md5hash an `images/<md5hash>` key names, or None for any other key."""
    if key.startswith(IMAGES_PREFIX) and len(key) > len(IMAGES_PREFIX):
        return key[len(IMAGES_PREFIX):]
    return None


# --- manifests ------------------------------------------------------------------------------
def dataset_key(fingerprint: str) -> str:
    """The ingested dataset rows: a private object (its URLs are kept as given, for refetch)."""
    return f"{PRIVATE_PREFIX}datasets/{fingerprint[:12]}.csv"


def private_run_config_key(run_id: str) -> str:
    """A run's configuration with its URLs as given (credentials included), for replaying the
    run; `run_params_key` holds the redacted one that reports show."""
    return f"{PRIVATE_PREFIX}runs/{run_id}/config.json"


def fetch_work_prefix(run_id: str) -> str:
    """A run's fetch in progress: each shard's rows and its manifest rows, handed between task
    runs by key instead of as parameters. Private (the rows hold the dataset's URLs as given);
    deleted once the run's fetch manifest is written."""
    return f"{PRIVATE_PREFIX}runs/{run_id}/fetch/"


FETCH_STAGES = ("import", "fetch")


def shard_rows_key(run_id: str, stage: str, index: int) -> str:
    """The rows shard `index` of a fetch `stage` (import from an image source, or by URL) is to do."""
    return f"{fetch_work_prefix(run_id)}{_stage(stage)}-{index:05d}.rows.json"


def shard_results_key(rows_key: str) -> str:
    """Where the manifest rows of the shard whose rows are at `rows_key` go."""
    if not rows_key.endswith(".rows.json"):
        raise ValueError(f"not a shard's rows key: {rows_key!r}")
    return rows_key[: -len(".rows.json")] + ".results.json"


def _stage(stage: str) -> str:
    if stage not in FETCH_STAGES:
        raise ValueError(f"fetch stage {stage!r} is not one of {FETCH_STAGES}")
    return stage


def fetch_manifest_history_key(run_id: str) -> str:
    return f"{MANIFESTS_PREFIX}fetch/{run_id}.csv"


def split_manifest_key(fingerprint: str) -> str:
    return f"{MANIFESTS_PREFIX}split-{fingerprint}.csv"


def split_summary_key(fingerprint: str) -> str:
    return f"{MANIFESTS_PREFIX}split-{fingerprint}.json"


def staged_input_prefix(digest: str) -> str:
    """Where a local input (file or folder) with content digest `digest` is staged."""
    if not re.fullmatch(r"[0-9a-f]{16,64}", digest):
        raise ValueError(f"not a hex digest: {digest!r}")
    return f"{PRIVATE_PREFIX}inputs/{digest}/"


# --- runs -----------------------------------------------------------------------------------
def run_prefix(run_id: str) -> str:
    return f"{RUNS_PREFIX}{run_id}/"


def run_key(run_id: str, *parts: str) -> str:
    return run_prefix(run_id) + "/".join(parts)


def run_params_key(run_id: str) -> str:
    return run_key(run_id, "params.json")


def run_metrics_key(run_id: str) -> str:
    return run_key(run_id, "metrics.json")


def report_key(run_id: str) -> str:
    return run_key(run_id, "report.html")


def figure_key(run_id: str, name: str) -> str:
    return run_key(run_id, "figures", f"{name}.png")


def run_active_key(run_id: str) -> str:
    """Written when a run starts and deleted when it ends: retention never deletes such a run."""
    return run_key(run_id, "active.json")


def run_id_of_key(key: str) -> str | None:
    """The run id of a `runs/<run_id>/...` key (or prefix), else None."""
    if not key.startswith(RUNS_PREFIX):
        return None
    run_id = key[len(RUNS_PREFIX):].split("/", 1)[0]
    return run_id or None


def models_prefix(run_id: str) -> str:
    return run_key(run_id, "models") + "/"


def model_prefix(run_id: str, architecture: str) -> str:
    return run_key(run_id, "models", architecture) + "/"


def model_key(run_id: str, architecture: str, name: str = MODEL_FILE) -> str:
    """A file of a trained model: `model.keras` (default), `metrics.json`, `history.json`,
    `params.json` or `predictions.npz`."""
    return model_prefix(run_id, architecture) + name


def model_score_key(run_id: str, architecture: str, split_hash: str) -> str:
    """A model's test score on another run's split (`evaluation.promotion.score_on_split`): how
    a champion was re-scored on a challenger's split, written by the trainer that scored it."""
    return model_key(run_id, architecture, f"scores/{split_hash}.json")


def checkpoints_prefix(run_id: str) -> str:
    return run_key(run_id, "checkpoints") + "/"


def checkpoint_prefix(run_id: str, architecture: str) -> str:
    return run_key(run_id, "checkpoints", architecture) + "/"


def checkpoint_key(run_id: str, architecture: str, epoch: int) -> str:
    return checkpoint_prefix(run_id, architecture) + f"epoch-{epoch:03d}.keras"


def averaged_checkpoint_key(run_id: str, architecture: str) -> str:
    """The model averaged over the annealed tail of a training (`TailAverage`)."""
    return checkpoint_prefix(run_id, architecture) + "averaged.keras"


def checkpoint_state_key(run_id: str, architecture: str) -> str:
    return checkpoint_prefix(run_id, architecture) + "state.json"


def checkpoint_epoch(key: str) -> int | None:
    """The epoch of a checkpoint key (`.../epoch-<NNN>.keras`), else None."""
    match = _CHECKPOINT_NAME.match(key.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


# --- tuning ---------------------------------------------------------------------------------
def tuning_prefix(tuning_id: str) -> str:
    return f"{TUNING_PREFIX}{tuning_id}/"


# --- registry -------------------------------------------------------------------------------
def registered_run_prefix(run_id: str) -> str:
    return f"{REGISTERED_MODELS_PREFIX}{run_id}/"


def registered_model_key(run_id: str, architecture: str) -> str:
    return f"{registered_run_prefix(run_id)}{architecture}.json"


def champion_key(label_set: str) -> str:
    return f"{CHAMPIONS_PREFIX}{label_set}{CHAMPION_SUFFIX}"


def champion_history_key(label_set: str) -> str:
    return f"{CHAMPIONS_PREFIX}{label_set}{CHAMPION_HISTORY_SUFFIX}"


def is_champion_key(key: str) -> bool:
    return (key.startswith(CHAMPIONS_PREFIX) and key.endswith(CHAMPION_SUFFIX)
            and not key.endswith(CHAMPION_HISTORY_SUFFIX))


def training_record_key(training_key: str) -> str:
    return f"{TRAININGS_PREFIX}{training_key}.json"


def promotions_prefix(label_set: str) -> str:
    return f"{PROMOTIONS_PREFIX}{label_set}/"


def promotion_record_key(label_set: str, sequence: int) -> str:
    """The `sequence`-th promotion of a label set (zero-padded, so keys sort in order)."""
    return f"{promotions_prefix(label_set)}{sequence:08d}.json"


# --- named run configurations ---------------------------------------------------------------
def is_config_name(name: object) -> bool:
    """A name a configuration may have: lower-case letters, digits, `-` and `_` (it becomes a key)."""
    return isinstance(name, str) and bool(_CONFIG_NAME.fullmatch(name))


def named_config_key(name: str) -> str:
    """A named run configuration; ValueError for a name that is not one (`../x`)."""
    if not is_config_name(name):
        raise ValueError(f"invalid configuration name {name!r}: lower-case letters, digits, '-' and '_' "
                         "(at most 64), starting with a letter or digit")
    return f"{CONFIGS_PREFIX}{name}.json"


def config_name_of_key(key: str) -> str | None:
    """The name of a `config/<name>.json` key, else None."""
    if key.startswith(CONFIGS_PREFIX) and key.endswith(".json"):
        name = key[len(CONFIGS_PREFIX):-len(".json")]
        return name if is_config_name(name) else None
    return None
