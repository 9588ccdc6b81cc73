"""dermflow core: pure functions and small classes for Fitzpatrick 17k classifiers (no Prefect)."""

import logging

# The core logs what it does at INFO (a fetch's shards, a training's resumption); the root
# logger's WARNING would drop that. Where a handler takes the `dermflow` loggers (Prefect's
# PREFECT_LOGGING_EXTRA_LOGGERS=dermflow in the workers `dermflow up` starts), INFO reaches it.
if logging.getLogger("dermflow").level == logging.NOTSET:
    logging.getLogger("dermflow").setLevel(logging.INFO)
