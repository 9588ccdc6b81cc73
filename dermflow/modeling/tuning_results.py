"""The results of a search, read from its keras-tuner project directory: every trial with its
score and its hyperparameters as a `TrainConfig` override, the best of them, and the flat rows
of the trial table artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dermflow.modeling.search_space import config_from_values


def read_trials(project_dir: Path, architecture: str) -> list[dict]:
    """Every trial of a keras-tuner project directory: id, status, score, raw values, config."""
    def order(path: Path):
        name = path.parent.name.removeprefix("trial_")
        return (0, int(name), name) if name.isdigit() else (1, 0, name)

    trials = []
    for path in sorted(Path(project_dir).glob("trial_*/trial.json"), key=order):
        state = json.loads(path.read_text())
        values = state.get("hyperparameters", {}).get("values", {})
        score = state.get("score")
        trials.append({
            "architecture": architecture,
            "trial_id": state.get("trial_id"),
            "status": state.get("status"),
            "score": None if score is None else float(score),
            "hyperparameters": config_from_values(architecture, values),
            "values": values,
        })
    return trials


def best_config(trials: list[dict]) -> dict | None:
    """The `TrainConfig` override of the best completed trial (None when none completed)."""
    done = [t for t in trials if t["status"] == "COMPLETED" and t["score"] is not None and not np.isnan(t["score"])]
    if not done:
        return None
    return max(done, key=lambda t: t["score"])["hyperparameters"]


def trial_table(trials: list[dict]) -> list[dict]:
    """One flat row per trial (hyperparameters spread into columns) for a table artifact."""
    rows = []
    for trial in trials:
        row = {"architecture": trial["architecture"], "trial": trial["trial_id"], "status": trial["status"],
               "val_weighted_f1": None if trial["score"] is None else round(trial["score"], 4)}
        for name, value in trial["hyperparameters"].items():
            if isinstance(value, dict):
                row.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                row[name] = round(value, 6) if isinstance(value, float) else value
        rows.append(row)
    return rows
