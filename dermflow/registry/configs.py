"""Saved run configurations: the one a run stored (`runs/<run_id>/params.json`), named ones
(`config/<name>.json`, written by `dermflow schedule set`), and which one a run takes.

A retrain must retrain what the user trains: `derm` in mode `retrain` takes the parameters of
the run that produced the current champion (or of a named configuration), and the parameters
given to the run explicitly win over them. `resolve_parameters` is that rule, pure; the rest
reads and writes the bucket. Storage only, no Prefect.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from dermflow.config import RUN_DEFAULTS, RunConfig
from dermflow.errors import DermflowError
from dermflow.layout import (
    CONFIGS_PREFIX,
    config_name_of_key,
    named_config_key,
    private_run_config_key,
    run_params_key,
)
from dermflow.registry.entries import list_champions, now_iso
from dermflow.storage import ObjectStore

# What a saved configuration never decides: the run's own mode, and which configuration it takes.
RUN_OWN_PARAMETERS = ("mode", "config")


class ConfigError(DermflowError, LookupError):
    """A saved configuration asked for does not exist or does not validate (permanent)."""


def _saved_parameters(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Flat parameters validated by RunConfig, without the run's own (`mode`, `config`)."""
    try:
        flat = RunConfig.from_parameters(**{k: v for k, v in parameters.items() if k not in RUN_OWN_PARAMETERS})
    except ValueError as error:
        raise ConfigError(f"saved configuration does not validate: {error}") from error
    return {k: v for k, v in flat.parameters().items() if k not in RUN_OWN_PARAMETERS}


def run_parameters(store: ObjectStore, run_id: str) -> dict[str, Any]:
    """The flat parameters a run used, as given: its private copy when redaction changed the
    stored one (URL credentials), else `runs/<run_id>/params.json`."""
    for key in (private_run_config_key(run_id), run_params_key(run_id)):
        if store.exists(key):
            stored = store.get_json(key)
            if "config" not in stored:
                raise ConfigError(f"{store.uri(key)} holds no run configuration (written by an older dermflow); "
                                  "choose one with `dermflow schedule set -p KEY=VALUE ...`")
            return _saved_parameters(RunConfig.model_validate(stored["config"]).parameters())
    raise ConfigError(f"run {run_id} has no stored configuration at {store.uri(run_params_key(run_id))}; "
                      "choose one with `dermflow schedule set -p KEY=VALUE ...`")


def champion_run(store: ObjectStore) -> dict | None:
    """The champion promoted last (of any label set), or None before the first promotion."""
    champions = list_champions(store)
    return champions[0] if champions else None


# --- named configurations ----------------------------------------------------------------------
def save_named_config(store: ObjectStore, name: str, parameters: Mapping[str, Any], source: str) -> dict:
    """Store `parameters` (flat, validated) as the configuration `name`; `source` says where
    they came from (a run id, `champion`, `defaults`), for `dermflow schedule show`."""
    record = {"name": name, "parameters": _saved_parameters(parameters), "source": source, "saved_at": now_iso()}
    store.put_json(named_config_key(name), record)
    return record


def read_named_config(store: ObjectStore, name: str) -> dict:
    """The configuration `name`; ConfigError listing the stored names when there is none."""
    key = named_config_key(name)
    if not store.exists(key):
        names = ", ".join(list_named_configs(store)) or "none"
        raise ConfigError(f"no saved configuration {name!r} at {store.uri(key)}; saved: {names}")
    record = store.get_json(key)
    return {**record, "parameters": _saved_parameters(record.get("parameters") or {})}


def list_named_configs(store: ObjectStore) -> list[str]:
    names = (config_name_of_key(key) for key in store.iter_keys(CONFIGS_PREFIX))
    return sorted(name for name in names if name)


# --- which configuration a run takes -----------------------------------------------------------
def saved_config_for(store: ObjectStore, mode: str, config: str | None) -> dict | None:
    """The saved configuration a `derm` run in `mode` takes: `{"source", "parameters"}`.

    `config` names one stored with `save_named_config`; None means none, except in mode
    `retrain`, which takes the champion's run's configuration (None before any champion: the
    run keeps its own parameters)."""
    if config:
        record = read_named_config(store, config)
        return {"source": f"config {config}", "parameters": record["parameters"]}
    if mode != "retrain":
        return None
    champion = champion_run(store)
    if champion is None:
        return None
    run_id = champion["run_id"]
    return {"source": f"champion's run {run_id}", "run_id": run_id, "parameters": run_parameters(store, run_id)}


def resolve_parameters(given: Mapping[str, Any], saved: Mapping[str, Any] | None,
                       passed: Iterable[str] | None = None) -> dict[str, Any]:
    """The flat parameters a run uses: the saved configuration, with the parameters given to the
    run explicitly on top; the run's own `mode` and `config` always come from `given`.

    `passed`: the names given explicitly (a deployment run's parameters). None when unknown (a
    direct call, where every parameter has a value): then a parameter counts as given when its
    value differs from the default."""
    if saved is None:
        return dict(given)
    if passed is None:
        explicit = {name for name, value in given.items() if value != RUN_DEFAULTS.get(name)}
    else:
        explicit = set(passed)
    resolved = {**given, **{k: v for k, v in saved.items() if k in given and k not in explicit}}
    for name in RUN_OWN_PARAMETERS:
        if name in given:
            resolved[name] = given[name]
    return resolved
