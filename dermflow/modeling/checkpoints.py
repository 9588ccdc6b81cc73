"""Per-epoch training checkpoints in the bucket, so that a rerun of the same run id resumes.

`CheckpointManager` saves each epoch's model under the run's checkpoint prefix, keeps the last N
and the best (by validation weighted F1), and records the training's state and history in
`state.json`.
"""

from __future__ import annotations

import math
from pathlib import Path

import keras

from dermflow import layout


class CheckpointManager:
    """Per-epoch checkpoints in the bucket plus `state.json`, keeping the last N and the best."""

    def __init__(self, store, run_id: str, architecture: str, local_dir: Path, keep: int):
        self.store = store
        self.run_id, self.architecture = run_id, architecture
        self.prefix = layout.checkpoint_prefix(run_id, architecture)
        self.state_key = layout.checkpoint_state_key(run_id, architecture)
        self.local_dir = Path(local_dir)
        self.local_dir.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.state: dict = {
            "status": "running", "epoch": 0, "phase": None, "phase_start_epoch": 0,
            "best_score": None, "best_epoch": None, "best_key": None, "checkpoints": [], "history": {},
        }

    def load(self) -> dict | None:
        if not self.store.exists(self.state_key):
            return None
        self.state = self.store.get_json(self.state_key)
        return self.state

    def key_for(self, epoch: int) -> str:
        return layout.checkpoint_key(self.run_id, self.architecture, epoch)

    def local_path(self, key: str) -> Path:
        return self.local_dir / Path(key).name

    def fetch(self, key: str) -> Path:
        path = self.local_path(key)
        if not path.exists():
            self.store.download_file(key, path)
        return path

    def record_epoch(self, model: keras.Model, epoch: int, phase: str, logs: dict, seconds: float) -> bool:
        """Save and upload epoch `epoch` (1-based), update state.json; True when it is the best."""
        key = self.key_for(epoch)
        path = self.local_path(key)
        model.save(path)
        self.store.put_file(key, path)
        row = {"epoch": epoch, "phase": phase, "seconds": round(seconds, 3), **scalar_logs(logs)}
        history = self.state.setdefault("history", {})
        length = len(history.get("epoch", []))
        for name in sorted(set(history) | set(row)):
            history.setdefault(name, [None] * length).append(row.get(name))
        score = float(logs.get("val_weighted_f1", float("nan")))
        improved = not math.isnan(score) and (self.state["best_score"] is None or score > self.state["best_score"])
        if improved:
            self.state.update(best_score=score, best_epoch=epoch, best_key=key)
        self.state["checkpoints"] = [k for k in self.state["checkpoints"] if k != key] + [key]
        self.state.update(epoch=epoch, phase=phase)
        # state.json is written after the checkpoint it names exists, and before pruning.
        self.store.put_json(self.state_key, self.state)
        self._prune()
        return improved

    def _prune(self) -> None:
        keep = set(self.state["checkpoints"][-self.keep :])
        if self.state["best_key"]:
            keep.add(self.state["best_key"])
        stale = [k for k in self.state["checkpoints"] if k not in keep]
        if not stale:
            return
        self.state["checkpoints"] = [k for k in self.state["checkpoints"] if k in keep]
        self.store.put_json(self.state_key, self.state)
        for key in stale:
            self.store.delete_prefix(key)  # the exact key: no other checkpoint's name extends it
            self.local_path(key).unlink(missing_ok=True)

    def record_averaged(self, model: keras.Model, score: float, epochs: int) -> str:
        """Save and upload the tail-averaged model with its val weighted F1; returns its key."""
        key = layout.averaged_checkpoint_key(self.run_id, self.architecture)
        path = self.local_path(key)
        model.save(path)
        self.store.put_file(key, path)
        self.save_state(averaged_key=key, averaged_score=float(score), averaged_epochs=int(epochs))
        return key

    def save_state(self, **updates) -> None:
        self.state.update(updates)
        self.store.put_json(self.state_key, self.state)


def scalar_logs(logs: dict | None) -> dict:
    out = {}
    for name, value in (logs or {}).items():
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out
