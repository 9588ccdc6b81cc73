"""The results of a search, read from its keras-tuner project directory: every trial with its
score, its hyperparameters as a `TrainConfig` override, whether it ran the space's defaults and
whether the tuning deadline cut it off; the config the final training takes; and the flat rows
of the trial table artifact.

The final training takes the best trial that finished (not cut off: a partial score is not
comparable) only when it scored higher than the defaults' trial; otherwise the defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dermflow.modeling.search_space import config_from_values


TRIAL_INFO_FILE = "dermflow_trial.json"  # written by the tuner next to trial.json


def read_trials(project_dir: Path, architecture: str) -> list[dict]:
    """Every trial of a keras-tuner project directory: id, status, score, raw values, config,
    `default` (it ran the space's defaults), `cut_off` (the tuning deadline ended it early)."""
    def order(path: Path):
        name = path.parent.name.removeprefix("trial_")
        return (0, int(name), name) if name.isdigit() else (1, 0, name)

    trials = []
    for path in sorted(Path(project_dir).glob("trial_*/trial.json"), key=order):
        state = json.loads(path.read_text())
        values = state.get("hyperparameters", {}).get("values", {})
        score = state.get("score")
        info_path = path.parent / TRIAL_INFO_FILE
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        hyperparameters = config_from_values(architecture, values)
        trials.append({
            "architecture": architecture,
            "trial_id": state.get("trial_id"),
            "status": state.get("status"),
            "score": None if score is None else float(score),
            "hyperparameters": hyperparameters,
            "values": values,
            "default": hyperparameters == config_from_values(architecture, {}),
            "cut_off": bool(info.get("cut_off", False)),
            "epochs": info.get("epochs"),
            "seconds": info.get("seconds"),
        })
    return trials


def eligible(trial: dict) -> bool:
    """A trial whose score can be compared: completed, scored, not cut off by the deadline."""
    score = trial.get("score")
    return (trial.get("status") == "COMPLETED" and score is not None and not np.isnan(score)
            and not trial.get("cut_off", False))


def choose_trial(trials: list[dict]) -> tuple[dict | None, str]:
    """(the trial the final training takes, why): the best eligible trial if it beat the defaults'
    trial; else the defaults' trial; (None, why) when no trial is eligible."""
    done = [t for t in trials if eligible(t)]
    if not done:
        return None, "no trial finished within its time (cut off or failed)"
    best = max(done, key=lambda t: t["score"])
    defaults = [t for t in done if t.get("default")]
    if best.get("default"):
        return best, "the defaults scored best"
    if defaults and best["score"] <= defaults[0]["score"]:
        return defaults[0], "no trial beat the defaults"
    return best, f"trial {best['trial_id']} beat the defaults" if defaults else f"trial {best['trial_id']} scored best"


def annotate_choice(trials: list[dict]) -> str:
    """In place: `chosen` on every trial (the one the final training takes); returns why."""
    chosen, why = choose_trial(trials)
    for trial in trials:
        trial["chosen"] = chosen is not None and trial["trial_id"] == chosen["trial_id"]
    return why if chosen is not None else why + "; the final training takes the defaults"


def best_config(trials: list[dict]) -> dict | None:
    """The `TrainConfig` override the final training takes (`choose_trial`); when trials ran but
    none is eligible, the space's defaults; None without trials."""
    chosen, _ = choose_trial(trials)
    if chosen is not None:
        return chosen["hyperparameters"]
    return config_from_values(trials[0]["architecture"], {}) if trials else None


def trial_table(trials: list[dict]) -> list[dict]:
    """One flat row per trial (hyperparameters spread into columns) for a table artifact."""
    rows = []
    for trial in trials:
        row = {"architecture": trial["architecture"], "trial": trial["trial_id"], "status": trial["status"],
               "cut_off": bool(trial.get("cut_off", False)), "default": bool(trial.get("default", False)),
               "chosen": bool(trial.get("chosen", False)),
               "val_weighted_f1": None if trial["score"] is None else round(trial["score"], 4)}
        for name, value in trial["hyperparameters"].items():
            if isinstance(value, dict):
                row.update({f"{name}.{k}": v for k, v in value.items()})
            else:
                row[name] = round(value, 6) if isinstance(value, float) else value
        rows.append(row)
    return rows
