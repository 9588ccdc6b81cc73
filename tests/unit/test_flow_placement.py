"""Where `derm` sends each training (issue 16): require_gpu and data_parallel reach the
`derm-train` runs, and spare GPUs go to data-parallel runs as blocks, each run holding as many
`gpu` slots as GPUs it sees. `run_deployment` is replaced by a recorder."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prefect.states import Completed

import flows.derm as derm

pytestmark = pytest.mark.unit


def _started(monkeypatch, gpu_count: int, data_parallel: bool, architectures=("baseline_cnn", "vgg16")) -> dict:
    calls = {}

    async def run_deployment(name, parameters, **kwargs):
        calls[parameters["architecture"]] = (parameters, kwargs)
        return SimpleNamespace(name=kwargs["flow_run_name"], state=Completed())

    monkeypatch.setenv("DERMFLOW_GPU_COUNT", str(gpu_count))
    monkeypatch.setattr(derm, "run_deployment", run_deployment)
    monkeypatch.setattr(derm, "current_flow_run", SimpleNamespace(run_count=1, id="parent", name="p"))
    monkeypatch.setattr(derm, "training_outcome", lambda run_id, arch, *a: {"architecture": arch, "status": "ok"})
    jobs = {a: {"epochs": 1, "require_gpu": True, "data_parallel": data_parallel} for a in architectures}
    asyncio.run(derm._train_all(jobs, "manifests/split.csv", "20260101-000000-x", "parent"))
    return calls


def test_spare_gpus_go_to_data_parallel_trainings_as_blocks(monkeypatch):
    calls = _started(monkeypatch, gpu_count=4, data_parallel=True)
    for architecture, gpus in (("baseline_cnn", "0,1"), ("vgg16", "2,3")):
        parameters, options = calls[architecture]
        assert parameters["gpu_slots"] == 2 and parameters["require_gpu"] is True
        assert options["job_variables"] == {"env": {"CUDA_VISIBLE_DEVICES": gpus}}


@pytest.mark.parametrize(("gpu_count", "data_parallel"), [(4, False), (2, True), (0, True)])
def test_otherwise_each_training_keeps_its_trainers_one_gpu(monkeypatch, gpu_count, data_parallel):
    calls = _started(monkeypatch, gpu_count, data_parallel)
    for parameters, options in calls.values():
        assert "gpu_slots" not in parameters and "job_variables" not in options
        assert parameters["data_parallel"] is data_parallel


def test_the_run_config_reaches_the_training_jobs(monkeypatch):
    from dermflow.config import RunConfig

    seen = {}

    async def train_all(jobs, split_key, run_id, parent_id):
        seen.update(jobs)
        return []

    monkeypatch.setattr(derm, "_train_all", train_all)
    config = RunConfig.from_parameters(architectures=["baseline_cnn"], require_gpu=True, data_parallel=True)
    asyncio.run(derm.train_architectures(config, {"hash": "h", "split_key": "k"}, "new", {"epochs": 1}, {}))
    assert seen["baseline_cnn"]["require_gpu"] is True and seen["baseline_cnn"]["data_parallel"] is True
