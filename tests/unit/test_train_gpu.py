"""Placement of a training (issue 16) without a GPU: the loud CPU fallback, `require_gpu`, the
OOM retry at half the batch size, the throughput figures, the data-parallel batches, and
data-parallel training on 2 virtual CPU devices (JAX, in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.unit

keras = pytest.importorskip("keras")

from dermflow import layout  # noqa: E402
from dermflow.modeling import devices, train  # noqa: E402
from dermflow.modeling.placement import check_placement  # noqa: E402
from tests.unit.test_train_steps import SPLIT_KEY, put_split, setup, tiny_config  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[2]
CPU_ONLY = {"backend": "jax", "devices": ["cpu:0 (cpu)"], "accelerator": False, "expect_gpu": True,
            "cuda_visible_devices": "0", "trainer_slot": "0", "pid": 1}


class XlaRuntimeError(RuntimeError):
    """Named like JAX's, with its message: what an out-of-memory step raises under JAX."""


def test_allocation_errors_are_told_apart_from_other_errors():
    assert devices.is_allocation_error(XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert devices.is_allocation_error(type("ResourceExhaustedError", (Exception,), {})("OOM when allocating"))
    assert devices.is_allocation_error(MemoryError())
    assert not devices.is_allocation_error(ValueError("shapes (3,) and (4,) not aligned"))


def test_a_trainer_that_should_have_a_gpu_and_has_none_warns_or_fails():
    [warning] = devices.check_placement(CPU_ONLY, require_gpu=False)
    assert "should train on a GPU but trains on the CPU" in warning and "CUDA_VISIBLE_DEVICES='0'" in warning
    assert devices.check_placement({**CPU_ONLY, "expect_gpu": False}, require_gpu=False) == []
    assert devices.check_placement({**CPU_ONLY, "accelerator": True}, require_gpu=True) == []
    with pytest.raises(devices.GPURequiredError, match="require_gpu=true but this trainer has no GPU") as raised:
        devices.check_placement({**CPU_ONLY, "expect_gpu": False}, require_gpu=True)
    assert not raised.value.transient  # a retry sees the same machine


def test_require_gpu_fails_before_any_data_is_read(tmp_path):
    from dermflow.settings import load_settings
    from tests.support.memory_s3 import memory_store

    store = memory_store()  # no split manifest: reading it would be another error
    with pytest.raises(devices.GPURequiredError):
        train.train_architecture(store, SPLIT_KEY, tiny_config(require_gpu=True), "20260101-000000-gpu",
                                 load_settings(cache_dir=tmp_path))


def test_the_cpu_fallback_is_reported_to_the_progress_callback(monkeypatch):
    monkeypatch.setenv("DERMFLOW_EXPECT_GPU", "1")
    events = []
    placement = check_placement(tiny_config(), events.append)
    assert placement.device["warnings"] and placement.device["expect_gpu"] is True
    assert [e["event"] for e in events] == ["placement"] and events[0]["warnings"] == placement.device["warnings"]
    assert placement.device["backend"] == keras.backend.backend()


def test_an_out_of_memory_training_retries_once_at_half_the_batch_size(setup, monkeypatch):
    store, settings = setup
    real_run_phases, batch_sizes = train.run_phases, []

    def run_phases(start, manager, config, data, **kwargs):
        batch_sizes.append(config.batch_size)
        if len(batch_sizes) == 1:
            raise XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.1GiB")
        return real_run_phases(start, manager, config, data, **kwargs)

    monkeypatch.setattr(train, "run_phases", run_phases)
    events = []
    summary = train.train_architecture(store, SPLIT_KEY, tiny_config(epochs=1), "20260101-000000-oom", settings,
                                       events.append)
    assert batch_sizes == [8, 4]
    assert summary["oom_retry"]["batch_size"] == 8 and summary["oom_retry"]["retry_batch_size"] == 4
    assert "RESOURCE_EXHAUSTED" in summary["oom_retry"]["error"]
    assert "oom_retry" in [e["event"] for e in events]
    params = store.get_json(layout.model_key("20260101-000000-oom", "baseline_cnn", "params.json"))
    assert params["batch_size"] == 4 and params["oom_retry"] == summary["oom_retry"]
    # the throughput and the device are recorded with the model
    assert summary["throughput"]["train_images_per_second"] > 0
    assert summary["throughput"]["inference_images_per_second"] > 0
    assert params["device"]["backend"] == keras.backend.backend() and params["device"]["devices"]


def test_another_error_is_not_retried(setup, monkeypatch):
    store, settings = setup

    def run_phases(*args, **kwargs):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(train, "run_phases", run_phases)
    with pytest.raises(ValueError, match="not a memory problem"):
        train.train_architecture(store, SPLIT_KEY, tiny_config(epochs=1), "20260101-000000-err", settings)


def test_data_parallel_batches_split_evenly_over_the_devices():
    from dermflow.dataset.arrays import _py_dataset_class

    class Arrays:  # what BatchGatherer reads
        images = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)
        labels = np.arange(7)
        class_names = [f"c{i}" for i in range(7)]

    def rows(batch):
        return list(batch[1].argmax(axis=1))  # the one-hot labels name the rows

    indices = np.arange(7)
    training = _py_dataset_class()(Arrays(), indices, 4, shuffle=True, multiple_of=2)
    assert len(training) == 2 and [len(rows(training[i])) for i in range(2)] == [4, 2]  # 3 rows: 2 kept
    predicting = _py_dataset_class()(Arrays(), indices, 4, shuffle=False, multiple_of=2)
    assert [rows(predicting[i]) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 6]]  # padded, then cut
    single = _py_dataset_class()(Arrays(), indices, 4, shuffle=False)
    assert [len(single[i][1]) for i in range(2)] == [4, 3]


def test_device_groups_spread_spare_gpus_only_when_asked():
    assert devices.device_groups(["a", "b"], 8, data_parallel=False) == {"a": [], "b": []}
    assert devices.device_groups(["a", "b"], 8, data_parallel=True) == {"a": [0, 1, 2, 3], "b": [4, 5, 6, 7]}
    assert devices.device_groups(["a", "b", "c"], 4, data_parallel=True) == {"a": [0], "b": [1], "c": [2]}
    assert devices.device_groups(["a", "b"], 2, data_parallel=True) == {"a": [], "b": []}  # one GPU each anyway


@pytest.mark.slow
def test_data_parallel_on_two_virtual_devices_matches_one_device():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "data_parallel_run.py")], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["devices"] == ["cpu:0", "cpu:1"]
    assert out["single"]["data_parallel_devices"] is None
    assert out["parallel"]["data_parallel_devices"] == ["cpu:0", "cpu:1"]
    np.testing.assert_allclose(out["parallel"]["y_prob"], out["single"]["y_prob"], atol=2e-3)
