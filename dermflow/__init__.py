"""dermflow core: pure functions and small classes for Fitzpatrick 17k classifiers (no Prefect)."""

import logging

# The core logs what it does at INFO (a fetch's shards, a training's resumption); the root
# logger's WARNING would drop that. Where a handler takes the `dermflow` loggers (Prefect's
# PREFECT_LOGGING_EXTRA_LOGGERS=dermflow in the workers `dermflow up` starts), INFO reaches it.
if logging.getLogger("dermflow").level == logging.NOTSET:
    logging.getLogger("dermflow").setLevel(logging.INFO)

def load_model(path):
    """Load a dermflow `model.keras` (a local path; `dermflow predict` caches the bucket's
    copies under `.dermflow/cache/models/`) in your own Python: registers dermflow's custom
    layers first (`import dermflow.modeling.models`), then `keras.saving.load_model(path,
    compile=False)`. Inputs: RGB uint8-range images of the model's `image_size`; outputs: class
    probabilities in the order of the model's `params.json` `class_names`."""
    from dermflow.evaluation.predict import load_keras_model

    return load_keras_model(path)
