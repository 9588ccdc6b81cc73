"""A distributed search: keras-tuner's chief/worker mode, each in its own process.

keras-tuner reads `KERASTUNER_TUNER_ID`, `KERASTUNER_ORACLE_IP` and `KERASTUNER_ORACLE_PORT`.
`serve_oracle` is the chief (the oracle's gRPC server, no training), `run_worker` a worker;
`python -m dermflow.modeling.tuning_distributed chief|worker --spec FILE` runs either in its own
process (`flows/tune.py` starts the chief so).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import keras

from dermflow.modeling.tuning import (
    SearchSpec,
    TrialData,
    TuningError,
    arrays_from_npz,
    load_training_arrays,
    make_tuner,
    trial_data,
)
from dermflow.modeling.tuning_sync import ProjectSync


@contextlib.contextmanager
def tuner_environment(role: str, host: str, port: int, tuner_id: str | None = None) -> Iterator[None]:
    """keras-tuner's chief/worker variables set for the block (restored after)."""
    values = {
        "KERASTUNER_TUNER_ID": "chief" if role == "chief" else (tuner_id or f"tuner-{os.getpid()}"),
        "KERASTUNER_ORACLE_IP": host,
        "KERASTUNER_ORACLE_PORT": str(port),
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve_oracle(spec: SearchSpec, host: str, port: int, sync: ProjectSync | None = None) -> None:
    """The chief: serve the oracle over gRPC until every worker was told to stop. No training."""
    if sync is not None:
        sync.pull()
    # The chief builds models only to discover the space: never download weights for that.
    with tuner_environment("chief", host, port):
        tuner = make_tuner(spec.model_copy(update={"weights": "none"}), None, sync)
        tuner.search()
    if sync is not None:
        sync.push()


def run_worker(spec: SearchSpec, data: TrialData, host: str, port: int, tuner_id: str,
               sync: ProjectSync | None = None) -> int:
    """A worker: ask the chief for trials and train them until it says stop; returns trials run."""
    keras.utils.set_random_seed(spec.seed)
    with tuner_environment("worker", host, port, tuner_id):
        tuner = make_tuner(spec, data, sync)
        ran = []
        original = tuner.on_trial_end

        def count(trial):
            ran.append(trial.trial_id)
            original(trial)

        tuner.on_trial_end = count
        tuner.search(epochs=spec.trial_epochs)
    return len(ran)


def wait_for_port(host: str, port: int, timeout: float = 120.0) -> None:
    """Block until something listens on host:port (the chief's gRPC server)."""
    end = time.time() + timeout
    while time.time() < end:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.3)
    # A chief slow to start (a loaded machine) may listen on the next try.
    raise TuningError(f"the tuning chief did not listen on {host}:{port} within {timeout:.0f} s", transient=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- processes


def _main(argv: list[str] | None = None) -> int:
    """`python -m dermflow.modeling.tuning_distributed chief|worker --spec FILE --host H --port P [--store]`.

    The spec file is `{"spec": SearchSpec fields, "split_key": ..., "tuner_id": ...}`; with
    `--store` the bucket (from the settings) is synced and, for a worker, the images read.
    """
    parser = argparse.ArgumentParser(prog="python -m dermflow.modeling.tuning_distributed")
    parser.add_argument("role", choices=("chief", "worker"))
    parser.add_argument("--spec", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--tuner-id", default=None)
    parser.add_argument("--arrays", default=None, help="worker: a local .npz with images, labels, split (tests)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    payload = json.loads(args.spec.read_text())
    spec = SearchSpec.from_dict(payload["spec"])
    sync = None
    store = settings = None
    if payload.get("split_key"):
        from dermflow.settings import get_settings
        from dermflow.storage import ObjectStore

        settings = get_settings()
        store = ObjectStore.from_settings(settings)
        if args.role == "worker":  # the spec's directory is the chief's host's
            spec = spec.on_this_host(settings).with_local_weights(store, settings)
        sync = ProjectSync(store, spec.tuning_id, spec.project_dir)
    if args.role == "chief":
        serve_oracle(spec, args.host, args.port, sync)
        return 0
    if args.arrays:
        arrays = arrays_from_npz(Path(args.arrays))
    else:
        arrays = load_training_arrays(store, payload["split_key"], spec.image_size, settings)
    ran = run_worker(spec, trial_data(arrays), args.host, args.port, args.tuner_id or f"worker-{os.getpid()}", sync)
    print(json.dumps({"tuner_id": args.tuner_id, "trials_run": ran}))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through subprocess tests
    sys.exit(_main())
