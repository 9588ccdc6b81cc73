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


def worker_folder() -> Path:
    """The folder the worker was started from. Prefect's process worker runs each flow run in
    a fresh temporary folder, so the flow run's own working directory says nothing; `PWD`, which
    the shell that started the worker exported, does (`dermflow up` sets DERMFLOW_PROJECT_ROOT
    for its workers instead)."""
    return Path(os.environ.get("PWD") or os.getcwd())


def use_installed_flows() -> dict:
    """Pull step: fix the flow run's project root (`DERMFLOW_PROJECT_ROOT`, unless set): by
    `settings.project_root`'s rule, seen from the worker's folder, so a checkout's `.env` and
    cache stay the checkout's and an installed host's stay in the folder its worker was started
    from. Then change into the folder of the installed flows. Returns `{"directory": ...}` like
    Prefect's `set_working_directory`."""
    from dermflow.settings import project_root

    os.environ.setdefault("DERMFLOW_PROJECT_ROOT", str(project_root(cwd=worker_folder())))
    directory = installed_flows_dir()
    os.chdir(directory)
    return {"directory": str(directory)}
