"""Tuning against a real SeaweedFS: resuming a search from the bucket, keras-tuner's chief/worker
mode with real processes, and the Prefect flow (in-process search, trial table artifact)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["alpha", "beta", "gamma"]


def put_synthetic_split(store, n_train: int = 30, n_val: int = 15, size: int = 40) -> str:
    """PNG images of three colour-coded classes in the bucket, and their split manifest."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for index in range(n_train + n_val):
        label = index % len(CLASSES)
        pixels = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
        pixels[:, :, label] += 120
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        md5 = f"{index:032x}"
        store.put_bytes(f"images/{md5}", buffer.getvalue())
        rows.append({"md5hash": md5, "label": CLASSES[label], "fitzpatrick_scale": "3",
                     "fitzpatrick_range": "III-IV", "qc": "", "split": "train" if index < n_train else "val",
                     "dup_group": str(index), "key": f"images/{md5}"})
    key = "manifests/split-synthetic0001.csv"
    store.put_dataframe_csv(key, pd.DataFrame(rows))
    return key


def test_a_search_resumes_from_the_bucket_on_another_machine(store, tmp_path):
    from dermflow.modeling import tuning
    from dermflow.settings import load_settings

    split_key = put_synthetic_split(store)
    options = dict(tuner="random", trial_epochs=1, image_size=32, batch_size=8, weights="none", seed=3)
    first = tuning.tune_architecture(store, split_key, "baseline_cnn", max_trials=1,
                                     settings=load_settings(cache_dir=tmp_path / "machine-a"), **options)
    assert len(first["trials"]) == 1 and first["best"] is not None
    prefix = f"tuning/{first['tuning_id']}/"
    keys = store.list_keys(prefix)
    assert prefix + "oracle.json" in keys and prefix + "trial_0/trial.json" in keys
    # A fresh local cache (another machine, or a wiped disk): the search continues from the bucket.
    second = tuning.tune_architecture(store, split_key, "baseline_cnn", max_trials=2,
                                      settings=load_settings(cache_dir=tmp_path / "machine-b"), **options)
    assert second["tuning_id"] == first["tuning_id"]
    assert [t["trial_id"] for t in second["trials"]] == ["0", "1"]
    assert second["trials"][0]["score"] == first["trials"][0]["score"]
    assert prefix + "trial_1/trial.json" in store.list_keys(prefix)


@pytest.mark.slow
def test_a_chief_and_two_worker_processes_share_one_search(store, s3_env, tmp_path):
    from dermflow.modeling import tuning, tuning_distributed, tuning_results
    from dermflow.settings import load_settings

    split_key = put_synthetic_split(store)
    settings = load_settings(cache_dir=tmp_path / "chief")
    spec = tuning.make_spec(store, split_key, "baseline_cnn", tuner="random", max_trials=4, trial_epochs=1,
                            image_size=32, batch_size=8, weights="none", seed=5, settings=settings)
    port = tuning_distributed.free_port()

    def launch(role: str, cache: str, *extra: str) -> subprocess.Popen:
        # Each process has its own local cache: the bucket is all they share (besides the chief).
        payload = tuning.spec_payload(
            tuning.SearchSpec(**{**tuning.spec_payload(spec)["spec"], "directory": str(tmp_path / cache / "tuning")}),
            split_key)
        spec_file = tmp_path / f"{cache}.json"
        spec_file.write_text(json.dumps(payload))
        env = {**os.environ, "DERMFLOW_CACHE_DIR": str(tmp_path / cache), "TF_CPP_MIN_LOG_LEVEL": "3"}
        return subprocess.Popen(
            [sys.executable, "-m", "dermflow.modeling.tuning_distributed", role, "--spec", str(spec_file), "--port", str(port), *extra],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    chief = launch("chief", "chief")
    workers = []
    try:
        tuning_distributed.wait_for_port("127.0.0.1", port, timeout=120)
        workers = [launch("worker", f"worker{i}", "--tuner-id", f"worker{i}") for i in range(2)]
        outputs = [w.communicate(timeout=400)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0], outputs
        ran = [json.loads(out.strip().splitlines()[-1])["trials_run"] for out in outputs]
        assert sum(ran) == 4 and min(ran) >= 1, ran  # both workers trained trials of the one search
        assert chief.wait(timeout=120) == 0, chief.stdout.read()
    finally:
        for process in [chief, *workers]:
            if process.poll() is None:
                process.kill()
    prefix = f"tuning/{spec.tuning_id}/"
    keys = store.list_keys(prefix)
    assert prefix + "oracle.json" in keys
    trial_keys = sorted(k for k in keys if k.endswith("/trial.json"))
    assert len(trial_keys) == 4
    states = [store.get_json(k) for k in trial_keys]
    assert all(s["status"] == "COMPLETED" and s["score"] is not None for s in states)
    # The chief's directory holds the whole search: what the parent flow reads the results from.
    trials = tuning_results.read_trials(Path(settings.local_cache_dir) / "tuning" / spec.tuning_id, "baseline_cnn")
    assert len(trials) == 4


@pytest.mark.slow
def test_tune_architectures_flow_returns_train_config_overrides(store, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from dermflow.modeling.train import TrainConfig

    monkeypatch.setenv("DERMFLOW_CACHE_DIR", str(tmp_path / "cache"))
    from dermflow.settings import get_settings

    get_settings.cache_clear()
    from tasks.common import object_store

    object_store.cache_clear()
    split_key = put_synthetic_split(store)
    train_params = {"image_size": 32, "epochs": 2, "batch_size": 8, "weights": "none", "seed": 1,
                    "deadline": time.time() + 600}

    import asyncio

    from prefect import flow

    from flows.tune import tune_architectures

    @flow
    async def parent() -> dict:
        return await tune_architectures(["baseline_cnn"], split_key, "20260101-000000-test", train_params,
                                        tuner="random", max_trials=2, trial_epochs=1)

    import flows.tune as tune_flows
    from types import SimpleNamespace

    from prefect.states import Completed

    async def run_on_a_trainer(name, parameters, **kwargs):
        """The `derm-tune-run/default` flow run a trainer would run, here in process."""
        assert name == tune_flows.SEARCH_DEPLOYMENT and kwargs["as_subflow"]
        await tune_flows.derm_tune_run(**parameters)
        return SimpleNamespace(name=kwargs["flow_run_name"], state=Completed())

    monkeypatch.setattr(tune_flows, "run_deployment", run_on_a_trainer)
    with prefect_test_harness(server_startup_timeout=120):
        result = asyncio.run(parent())
        from prefect.client.orchestration import get_client

        async def artifacts():
            async with get_client() as client:
                return await client.read_artifacts()

        found = asyncio.run(artifacts())
    object_store.cache_clear()
    assert [t["trial_id"] for t in result["trials"]] == ["0", "1"]
    assert all(set(t) == {"architecture", "trial_id", "hyperparameters", "score", "status", "default", "cut_off",
                          "chosen"} for t in result["trials"])
    assert result["trials"][0]["default"] and sum(t["chosen"] for t in result["trials"]) == 1
    best = result["best"]["baseline_cnn"]
    # As flows/train.py does: the tuned values override the run's parameters.
    config = TrainConfig(**{"architecture": "baseline_cnn", **train_params, **best})
    assert config.arch_options["depth"] in (3, 4, 5)
    scores = [t["score"] for t in result["trials"]]
    assert best == result["trials"][int(np.argmax(scores))]["hyperparameters"]
    tables = [a for a in found if a.type == "table" and a.key and a.key.startswith("tuning-")]
    assert tables and "val_weighted_f1" in str(tables[0].data)


@pytest.mark.slow
def test_distributed_search_flow_runs_a_chief_and_worker_runs(store, tmp_path, monkeypatch):
    """`derm-tune-search` with workers=2: the chief is its child process; the two worker flow
    runs are stood in for by worker processes (what `derm-tune/worker` runs), started where
    the flow calls `run_deployment`."""
    import asyncio
    from types import SimpleNamespace

    from prefect.testing.utilities import prefect_test_harness

    import flows.tune as tune_flows

    monkeypatch.setenv("DERMFLOW_CACHE_DIR", str(tmp_path / "parent"))
    from dermflow.settings import get_settings
    from tasks.common import object_store

    get_settings.cache_clear()
    object_store.cache_clear()
    split_key = put_synthetic_split(store)
    started = []

    async def fake_run_deployment(name, parameters, **kwargs):
        assert name == tune_flows.WORKER_DEPLOYMENT
        tuner_id = parameters["tuner_id"]
        spec_file = tmp_path / f"{tuner_id}.json"
        payload = parameters["payload"]
        payload = {**payload, "spec": {**payload["spec"], "directory": str(tmp_path / tuner_id / "tuning")}}
        spec_file.write_text(json.dumps(payload))
        env = {**os.environ, "DERMFLOW_CACHE_DIR": str(tmp_path / tuner_id), "TF_CPP_MIN_LOG_LEVEL": "3"}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dermflow.modeling.tuning_distributed", "worker", "--spec", str(spec_file),
            "--host", parameters["oracle_host"], "--port", str(parameters["oracle_port"]), "--tuner-id", tuner_id,
            cwd=str(PROJECT_ROOT), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await process.communicate()
        started.append((tuner_id, process.returncode, output.decode(errors="replace")[-2000:]))
        state = SimpleNamespace(name="Completed" if process.returncode == 0 else "Failed")
        return SimpleNamespace(name=kwargs.get("flow_run_name"), state=state)

    monkeypatch.setattr(tune_flows, "run_deployment", fake_run_deployment)
    with prefect_test_harness(server_startup_timeout=120):
        result = asyncio.run(tune_flows.tune_architecture(
            architecture="baseline_cnn", split_key=split_key, run_id="20260101-000000-dist", image_size=32,
            epochs=2, batch_size=8, weights="none", seed=2, max_trials=3, trial_epochs=1, workers=2))
    object_store.cache_clear()
    assert sorted(t for t, _, _ in started) == ["worker0", "worker1"]
    assert all(code == 0 for _, code, _ in started), started
    ran = [json.loads(out.strip().splitlines()[-1])["trials_run"] for _, _, out in started]
    assert sum(ran) == 3
    assert [t["trial_id"] for t in result["trials"]] == ["0", "1", "2"]
    assert all(t["status"] == "COMPLETED" for t in result["trials"])
    assert result["best"] is not None
