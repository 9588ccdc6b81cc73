"""Deployment pull steps that run on the worker's host, when a flow run starts.

`prefect.yaml` templates (`{{ $VAR }}`) are resolved where the deployments are registered, so a
path written there is a path of the registering host. `use_installed_flows` instead finds the
flows where this host installed dermflow: a clone, an editable install, a wheel in a venv or
an image all work, and the hosts need not share a filesystem.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def installed_flows_dir() -> Path:
    """The folder holding this host's `flows/` package (the deployments' entrypoints are
    relative to it): the checkout, or site-packages for a non-editable install."""
    spec = importlib.util.find_spec("flows")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dermflow flows package is not installed on this host")
    return Path(next(iter(spec.submodule_search_locations))).resolve().parent


def use_installed_flows() -> dict:
    """Pull step: keep the worker's folder as the project root of the flow run
    (`DERMFLOW_PROJECT_ROOT`, unless set: its `.env` and cache stay the worker's), then change
    into the folder of the installed flows. Returns `{"directory": ...}` like Prefect's
    `set_working_directory`."""
    os.environ.setdefault("DERMFLOW_PROJECT_ROOT", os.getcwd())
    directory = installed_flows_dir()
    os.chdir(directory)
    return {"directory": str(directory)}
